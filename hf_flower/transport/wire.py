"""The weights as they travel between the server and long-lived clients: cast to
`--transfer_dtype` and back, and packed as one flat array.

Flower moves each ``Array`` of a message as separate objects, one request per object on every
hop (ServerApp -> SuperLink -> SuperNode -> client, and back). A model's hundred-odd tensors
cost more in requests than in bytes: for MiniLM, halving the bytes (bfloat16) cut a round's
overhead by 5% only, while one flat array turns 219 objects into 20. `pack` replaces a message's `arrays`
record by the flat array and its layout (`pack_arrays`); `unpack` restores it exactly
(`unpack_arrays`), so strategies, mods and the ClientApp only ever see ordinary per-tensor records.

The server packs only for clients that have said they unpack (`scripts/client.py`, see
`transport.exchange`); replies are unpacked whenever they arrive packed. The server also casts
outgoing weights to `--transfer_dtype` (`cast_arrays`) and received float16/bfloat16 weights back
to float32 (`to_float32_arrays`) before a strategy averages them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..constants import ARRAYS_KEY, PACKED_ARRAYS_KEY, PACKED_LAYOUT_KEY

# The codec of `weights.py` (views on the message bytes, without copies): the wire format is
# built from the same encoding as every other weights message.
from ..weights import WeightsMismatchError, _decode, _readonly_views, _tensor_to_array, transfer_dtype

FLAT_ARRAY_NAME = "flat"


def packed_records(arrays: ArrayRecord) -> dict | None:
    """The records that stand for `arrays` on the wire: one flat array and its layout.

    None when the arrays cannot be packed (`pack_arrays`). Messages that carry the same
    weights can share these records: packing copies all the weights once.
    """
    packed = pack_arrays(arrays)
    if packed is None:
        return None
    array, layout = packed
    return {PACKED_ARRAYS_KEY: ArrayRecord({FLAT_ARRAY_NAME: array}), PACKED_LAYOUT_KEY: ConfigRecord(layout)}


def pack(content: RecordDict, records: dict | None = None) -> None:
    """Replace the `arrays` record of `content` by `records` (in place), packing them if not given."""
    if ARRAYS_KEY not in content.array_records:
        return
    if records is None:
        records = packed_records(content[ARRAYS_KEY])
    if records is None:
        return
    del content[ARRAYS_KEY]
    for key, record in records.items():
        content[key] = record


def unpack(content: RecordDict) -> None:
    """Restore the `arrays` record that `pack` replaced (in place); other content is untouched."""
    if PACKED_ARRAYS_KEY not in content.array_records:
        return
    layout = content.config_records[PACKED_LAYOUT_KEY]
    content[ARRAYS_KEY] = unpack_arrays(content[PACKED_ARRAYS_KEY][FLAT_ARRAY_NAME], layout)
    del content[PACKED_ARRAYS_KEY]
    del content[PACKED_LAYOUT_KEY]


def pack_arrays(arrays: Mapping[str, Array]) -> tuple[Array, dict[str, list]] | None:
    """All of ``arrays`` as one flat ``Array``, and the layout that splits it again.

    Flower moves every ``Array`` of a message as its own objects (one more per 5 MB), each a
    request on every hop: MiniLM's 105 tensors make 219 objects, one flat array 20. Returns None
    when the arrays do not share one dtype (or are all scalars): send those as they are.
    """
    with _readonly_views():
        views = {name: _decode(name, array) for name, array in arrays.items()}
    if len({view.dtype for view in views.values()}) != 1 or all(v.dim() == 0 for v in views.values()):
        return None
    layout = {
        "names": list(views),
        "ndims": [view.dim() for view in views.values()],
        "dims": [int(n) for view in views.values() for n in view.shape],
    }
    with _readonly_views():
        flat = torch.cat([view.reshape(-1) for view in views.values()])
    return _tensor_to_array("packed", flat, None), layout


def unpack_arrays(packed: Array, layout: Mapping[str, list]) -> ArrayRecord:
    """The arrays `pack_arrays` packed, as an ``ArrayRecord`` in their original order.

    The layout comes from the sender: it is checked whole (`_packed_shapes`) before any value
    is read, so a malformed one is a ``WeightsMismatchError``, never a crash or a wrong split.
    """
    with _readonly_views():
        flat = _decode("packed", packed)
    names, shapes = _packed_shapes(layout)
    if flat.dim() != 1:
        raise WeightsMismatchError(
            f"Received packed weights of shape {tuple(flat.shape)}; expected one flat array."
        )
    if sum(math.prod(shape) for shape in shapes) != flat.numel():
        raise WeightsMismatchError(
            f"Received {flat.numel()} packed values for a layout of "
            f"{sum(math.prod(shape) for shape in shapes)}; the message is truncated or corrupt."
        )
    out, offset = ArrayRecord(), 0
    with _readonly_views():
        for name, shape in zip(names, shapes):
            count = math.prod(shape)
            out[name] = _tensor_to_array(name, flat[offset : offset + count].reshape(shape), None)
            offset += count
    return out


def _packed_shapes(layout: Mapping[str, list]) -> tuple[list[str], list[tuple[int, ...]]]:
    """The names and shapes a packed layout describes, after checking that it is one `pack_arrays`
    could have written: distinct names, one non-negative rank per name, non-negative dims that
    add up to those ranks."""
    names, ndims, dims = (layout.get(key) for key in ("names", "ndims", "dims"))
    valid = (
        isinstance(names, list)
        and all(isinstance(name, str) for name in names)
        and len(set(names)) == len(names)
        and _non_negative_ints(ndims)
        and _non_negative_ints(dims)
        and len(ndims) == len(names)
        and sum(ndims) == len(dims)
    )
    if not valid:
        raise WeightsMismatchError(
            "Received packed weights with an inconsistent layout (names, ndims and dims must be lists "
            "of distinct names and non-negative integers that match); the message is corrupt."
        )
    shapes, start = [], 0
    for ndim in ndims:
        shapes.append(tuple(dims[start : start + ndim]))
        start += ndim
    return names, shapes


def _non_negative_ints(values) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def cast_arrays(arrays: ArrayRecord, dtype: str | torch.dtype) -> ArrayRecord:
    """``arrays`` with floating-point entries re-encoded in ``dtype`` (others passed through).

    What the server sends under `--transfer_dtype`: its strategy holds float32 arrays.
    """
    dtype = transfer_dtype(dtype)
    out = ArrayRecord()
    with _readonly_views():
        for name, array in arrays.items():
            view = _decode(name, array)
            out[name] = (
                _tensor_to_array(name, view, dtype)
                if view.dtype.is_floating_point and view.dtype != dtype
                else array
            )
    return out


def to_float32_arrays(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with float16/bfloat16 entries as float32 `.npy`, for averaging on the server.

    Flower's strategies compute in the arrays' own dtype (``value.numpy() * weight`` stays
    float16 for float16 arrays) and cannot read bfloat16 at all: upcasting first keeps the
    aggregation in float32. Other entries are passed through as the same ``Array`` objects.
    """
    out = ArrayRecord()
    with _readonly_views():
        for name, array in arrays.items():
            if array.dtype in ("float16", "bfloat16"):
                out[name] = _tensor_to_array(name, _decode(name, array).float(), None)
            else:
                out[name] = array
    return out
