"""Deployments as code: the olivepress flow on a local process pool, a Docker GPU pool or a Kubernetes GPU pool."""
