"""Credentials from Prefect Secret blocks, set in the run's own environment when it starts.

A team keeps HF_TOKEN and its AWS and Azure credentials in Prefect blocks, not in job templates. The config
names the blocks (``secrets``: variable → block); the values are read from the Prefect API on the machine
that runs the flow and live only in that process's environment, which the libraries that need them read
(huggingface_hub, boto3/s3fs, azure-identity) and the run's child processes (training, base builds)
inherit. The config, the run folder and the report hold the block names only.
"""

from __future__ import annotations

import os

from olivepress.errors import UserError


def apply_secrets(secrets: dict[str, str]) -> list[str]:
    """Set each variable of ``secrets`` to the value of the Secret block it names; return the variables set.

    Every block is read before any variable is set, so a missing one changes nothing."""
    from prefect.blocks.system import Secret

    values = {}
    for variable, block in secrets.items():
        try:
            value = Secret.load(block).get()
        except ValueError as error:  # Prefect's error for a block it does not hold
            raise UserError(
                f"secrets.{variable}: the Prefect server has no Secret block named {block!r} (create it in "
                f"the UI under Blocks → Secret, or with Secret(value=...).save({block!r}))"
            ) from error
        if not isinstance(value, str):
            raise UserError(f"secrets.{variable}: Secret block {block!r} holds JSON, not one string")
        values[variable] = value
    os.environ.update(values)
    return list(values)
