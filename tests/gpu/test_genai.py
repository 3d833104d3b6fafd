"""The int4 CUDA export with its adapter switched off and on, against the PyTorch model it came from."""

import numpy as np
import pytest

from olivepress.genai import ADAPTER_FILE, open_model, prompt_token_ids, sequence_logits

pytestmark = pytest.mark.gpu


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_the_adapter_changes_the_cuda_logits_as_it_changes_pytorchs(
    cuda_export_dir, tiny_int4_dir, cuda_adapter_dir
):
    from peft import PeftModel

    from olivepress.export.int4 import load_dequantized_model

    plain = open_model(cuda_export_dir)
    adapted = open_model(cuda_export_dir, cuda_export_dir / ADAPTER_FILE)
    ids = prompt_token_ids(plain, "Where should I go in Lisbon?")
    off = sequence_logits(plain, ids).astype(np.float32)
    on = sequence_logits(adapted, ids).astype(np.float32)
    assert off.shape == on.shape == (len(ids), off.shape[-1])
    assert np.isfinite(off).all() and np.isfinite(on).all()
    # On CPU this adapter moves the tiny model's logits by about 1.1 at most; fp16 on CUDA is off by ~1e-3.
    assert np.abs(on - off).max() > 0.1, "the adapter must change the logits"

    base = load_dequantized_model(tiny_int4_dir).eval()
    np.testing.assert_allclose(off, torch_logits(base, ids), atol=0.05)
    tuned = PeftModel.from_pretrained(base, cuda_adapter_dir).eval()
    np.testing.assert_allclose(on, torch_logits(tuned, ids), atol=0.05)
    # the same adapter fed at run time (og.Adapters) instead of held in the merged graph
    run_time = open_model(cuda_export_dir, cuda_export_dir / ADAPTER_FILE, run_time_adapter=True)
    np.testing.assert_allclose(sequence_logits(run_time, ids).astype(np.float32), on, atol=0.02)
