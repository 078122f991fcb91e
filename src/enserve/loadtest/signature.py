"""What a request to a model looks like, read from its ModelMetadata, so that the load tests (the
Locust users, ``enserve bench``) speak for any model: its first input's name, type and shape, and
its first output's name and size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Signature:
    input: str
    datatype: str
    dims: tuple[int, ...]  # without the batch axis
    output: str
    row_bytes: int  # of the first output, per row

    def batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` rows of input: uniform in [0, 1) for floating types, small integers otherwise."""
        from tritonclient.utils import triton_to_np_dtype

        dtype = np.dtype(triton_to_np_dtype(self.datatype))
        if dtype.kind == "f":
            return rng.random((n, *self.dims)).astype(dtype)
        return rng.integers(0, 10, (n, *self.dims)).astype(dtype)


def signature(url: str, model: str) -> Signature:
    """``model``'s signature, from the KServe v2 gRPC server at ``url``."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import triton_to_np_dtype

    with grpcclient.InferenceServerClient(url) as client:  # closed: an open channel keeps Locust from exiting
        meta = client.get_model_metadata(model)
    inp, out = meta.inputs[0], meta.outputs[0]
    row = int(np.prod([int(d) for d in out.shape[1:]])) * np.dtype(triton_to_np_dtype(out.datatype)).itemsize
    return Signature(inp.name, inp.datatype, tuple(int(d) for d in inp.shape[1:]), out.name, row)
