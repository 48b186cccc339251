"""What a sweep's chunk file holds: outputs in dtypes NumPy stores, with the same names, dtypes and row shapes
in every chunk (`jaxadv.sweep.run_sweep` checks them before a chunk is saved).

    arrays = encode(outputs, where="chunk 0 of 'runs/x'")   # bfloat16 & co. as their bits, the dtype recorded
    outputs = decode(dict(np.load(path)))                    # bfloat16 again
    check_spec(outputs, spec(first_chunk), where="chunk 3 of 'runs/x'", first="chunk 0")

`np.savez` writes an ml_dtypes array (JAX's bfloat16, float8_*, int4) as raw void bytes that load back as
`|V2`; here it is stored as unsigned integers of its width and viewed back as its dtype on load, bit for bit.
"""
from __future__ import annotations

import json
from typing import Mapping

import ml_dtypes
import numpy as np

#: The key under which a chunk records {output: ml_dtypes name} for the outputs stored as their bits.
DTYPES_KEY = "__dtypes__"
#: NumPy's own dtype kinds that np.savez writes and np.load reads back without pickling.
_NUMPY_KINDS = frozenset("biufcSUMm")


def _ml_dtype(dtype: np.dtype):
    """The ml_dtypes type of `dtype` (bfloat16, float8_*, int4, ...), or None."""
    candidate = getattr(ml_dtypes, dtype.name, None)
    return candidate if isinstance(candidate, type) and np.dtype(candidate) == dtype else None


def check_storable(outputs: Mapping[str, np.ndarray], where: str) -> None:
    """TypeError naming the output unless each of `outputs` has a dtype a chunk file stores and loads back."""
    for name, value in outputs.items():
        dtype = np.asarray(value).dtype
        if dtype.kind in _NUMPY_KINDS and dtype.type.__module__ == "numpy" or _ml_dtype(dtype) is not None:
            continue
        raise TypeError(f"fn: output {name!r} of {where} has dtype {dtype}, which a chunk file cannot store; "
                        "return numbers, booleans or strings (convert it with .astype)")


def encode(outputs: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """`outputs` as np.savez stores them: an ml_dtypes array as unsigned integers of its width, named in
    DTYPES_KEY (checked storable first)."""
    check_storable(outputs, where)
    arrays, dtypes = {}, {}
    for name, value in outputs.items():
        value = np.asarray(value)
        if _ml_dtype(value.dtype) is not None:
            dtypes[name] = value.dtype.name
            value = value.view(f"u{value.dtype.itemsize}")
        arrays[name] = value
    if DTYPES_KEY in arrays:
        raise ValueError(f"fn: the output name {DTYPES_KEY!r} is reserved")
    if dtypes:
        arrays[DTYPES_KEY] = np.asarray(json.dumps(dtypes, sort_keys=True))
    return arrays


def decode(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `encode` stored, in the outputs' own dtypes."""
    arrays = dict(arrays)
    dtypes = json.loads(str(arrays.pop(DTYPES_KEY))) if DTYPES_KEY in arrays else {}
    for name, dtype_name in dtypes.items():
        arrays[name] = arrays[name].view(np.dtype(getattr(ml_dtypes, dtype_name)))
    return arrays


def spec(outputs: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{output: (dtype name, shape of one row)}: what every chunk of a sweep must return alike."""
    return {name: (np.asarray(v).dtype.name, tuple(np.shape(v)[1:])) for name, v in sorted(outputs.items())}


def check_spec(outputs: Mapping[str, np.ndarray], expected: Mapping, where: str, first: str) -> None:
    """ValueError naming `where` and the output unless `outputs` have `expected`'s names, dtypes and row shapes
    (those of `first`): results that could not be concatenated are refused before they are saved."""
    found = spec(outputs)
    if set(found) != set(expected):
        raise ValueError(f"fn: {where} returned outputs {sorted(found)}, but {first} returned {sorted(expected)}; "
                         "a sweep's every chunk must return the same outputs")
    for name, (dtype, row) in found.items():
        if (dtype, tuple(row)) != (expected[name][0], tuple(expected[name][1])):
            raise ValueError(f"fn: output {name!r} of {where} is {dtype}{list(row)} per row, but {first}'s was "
                             f"{expected[name][0]}{list(expected[name][1])}; a sweep's outputs must keep their dtype "
                             "and the shape of a row in every chunk (pad them to a fixed size)")
