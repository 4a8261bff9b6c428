"""The weights as they travel between the server and long-lived clients: cast to
`--transfer_dtype` and back, and packed as one flat array.

Flower moves each ``Array`` of a message as separate objects, one request per object on every
hop (ServerApp -> SuperLink -> SuperNode -> client, and back). A model's hundred-odd tensors
cost more in requests than in bytes: for MiniLM, halving the bytes (bfloat16) cut a round's
overhead by 5% only, while one flat array turns 219 objects into 20. `pack` replaces a message's `arrays`
record by the flat array and its layout (`pack_arrays`); `unpack` restores it exactly
(`unpack_arrays`), so strategies, mods and the ClientApp only ever see ordinary per-tensor records.

Weights also leave out the rows of each 2-D tensor that equal weights the receiver holds (the
`base`, named by Flower object id), when at most half of them changed: a long-lived client's
training reply against the weights it was sent, and the server's next aggregate against the one the
client holds. The receiver puts the rows back from its base. An embedding matrix only changes in the
rows of tokens a round saw (Trainer's default `weight_decay` 0 leaves the others exactly as they
were, and averaging equal rows gives them back exactly): MiniLM's is half the model, and a client of
the quickstart changes a quarter of its rows, so its reply is 39% smaller. Other tensors change in
most rows and go whole; so does everything under weight decay, which moves every row a little.

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
from ..weights import (
    WeightsMismatchError,
    decode_view,
    readonly_views,
    tensor_to_array,
    transfer_dtype,
)

FLAT_ARRAY_NAME = "flat"
# The indices of the rows sent of the tensors sent by rows (int64, tensor after tensor).
ROWS_ARRAY_NAME = "rows"
# A 2-D tensor goes as its changed rows when at most this share of its rows changed.
MAX_CHANGED_ROWS_SHARE = 0.5


def packed_records(
    arrays: ArrayRecord, base_id: str | None = None, base: Mapping[str, Array] | None = None
) -> dict | None:
    """The records that stand for `arrays` on the wire: the packed arrays and their layout.

    None when the arrays cannot be packed (`pack_arrays`). Messages that carry the same
    weights can share these records: packing copies all the weights once. With `base` (weights
    the receiver holds, whose Flower object id is `base_id`), 2-D tensors that changed in few rows
    go as those rows.
    """
    packed = pack_arrays(arrays, base_id, base)
    if packed is None:
        return None
    records, layout = packed
    return {PACKED_ARRAYS_KEY: ArrayRecord(records), PACKED_LAYOUT_KEY: ConfigRecord(layout)}


def pack(
    content: RecordDict,
    records: dict | None = None,
    base_id: str | None = None,
    base: Mapping[str, Array] | None = None,
) -> None:
    """Replace the `arrays` record of `content` by `records` (in place), packing them if not given
    (against `base`, see `packed_records`)."""
    if ARRAYS_KEY not in content.array_records:
        return
    if records is None:
        records = packed_records(content[ARRAYS_KEY], base_id, base)
    if records is None:
        return
    del content[ARRAYS_KEY]
    for key, record in records.items():
        content[key] = record


class BaseNotHeldError(WeightsMismatchError):
    """Weights sent by rows name a base the receiver does not hold."""


def unpack(content: RecordDict, bases: Mapping[str, Mapping[str, Array]] | None = None) -> None:
    """Restore the `arrays` record that `pack` replaced (in place); other content is untouched.
    `bases`: weights the receiver holds, by Flower object id, which packed rows may complete."""
    if PACKED_ARRAYS_KEY not in content.array_records:
        return
    layout = content.config_records[PACKED_LAYOUT_KEY]
    content[ARRAYS_KEY] = unpack_arrays(content[PACKED_ARRAYS_KEY], layout, bases)
    del content[PACKED_ARRAYS_KEY]
    del content[PACKED_LAYOUT_KEY]


def check_layout(content: RecordDict, reference: Mapping[str, torch.Tensor], dtype: str) -> None:
    """Refuse packed `content` whose declared layout is not one of `reference` (the model's weights
    by name) in `dtype` (a `TRANSFER_DTYPES` name), before anything of it is built or read.

    `unpack` builds one ``Array`` per declared name: a reply of a few MB declaring 200,000 names
    cost the server 17.9 s of CPU before the names were compared with the model. Here the count of
    names is compared first (nothing read per name), then names, ranks and dims with the model's,
    then the dtype and sizes the packed arrays declare, all without decoding a value. Raises
    ``WeightsMismatchError``.
    """
    layout = content.config_records[PACKED_LAYOUT_KEY]
    names, ndims, dims = (layout.get(key) for key in ("names", "ndims", "dims"))
    if not isinstance(names, list) or len(names) != len(reference):
        declared = f"{len(names)} tensors" if isinstance(names, list) else "no list of tensor names"
        raise WeightsMismatchError(
            f"Received packed weights declaring {declared}; the model has {len(reference)}. The reply is "
            "corrupt or from another model."
        )
    if not all(isinstance(name, str) for name in names) or set(names) != set(reference):
        unknown = sorted({str(name) for name in names} - set(reference))[:5]
        raise WeightsMismatchError(f"Received packed weights with names the model lacks: {unknown}.")
    if ndims != [reference[name].dim() for name in names] or dims != [
        int(n) for name in names for n in reference[name].shape
    ]:
        raise WeightsMismatchError(
            "Received packed weights whose declared shapes differ from the model's; the reply is corrupt "
            "or from another model."
        )
    arrays = content.array_records[PACKED_ARRAYS_KEY]
    flat = arrays.get(FLAT_ARRAY_NAME)
    if flat is None:
        raise WeightsMismatchError(f"Received packed weights without their {FLAT_ARRAY_NAME!r} array.")
    if all(t.is_floating_point() for t in reference.values()) and flat.dtype != dtype:
        raise WeightsMismatchError(f"Received packed weights in {flat.dtype}, expected {dtype}.")
    # Neither the values nor the row indices (int64, one per row) outnumber the model's values.
    values = sum(t.numel() for t in reference.values())
    for name, array in arrays.items():
        if len(array.shape) != 1 or array.shape[0] > values or len(array.data) > 8 * values + 1024:
            raise WeightsMismatchError(
                f"Received a packed array {str(name)[:40]!r} larger than the model's {values} values; the "
                "reply is corrupt."
            )


def pack_arrays(
    arrays: Mapping[str, Array], base_id: str | None = None, base: Mapping[str, Array] | None = None
) -> tuple[dict[str, Array], dict[str, list]] | None:
    """All of ``arrays`` as one flat ``Array`` (plus the indices of rows sent alone), and the
    layout that splits it again.

    Flower moves every ``Array`` of a message as its own objects (one more per 5 MB), each a
    request on every hop: MiniLM's 105 tensors make 219 objects, one flat array 20. Returns None
    when the arrays do not share one dtype (or are all scalars): send those as they are.

    With `base` (weights the receiver holds; `base_id`, their Flower object id): a 2-D tensor of
    which at most `MAX_CHANGED_ROWS_SHARE` of the rows differ from `base` goes as those rows and
    their indices (`ROWS_ARRAY_NAME`); the layout names the base and each tensor's row count.
    """
    with readonly_views():
        views = {name: decode_view(name, array) for name, array in arrays.items()}
        base_views = {} if base is None else {n: decode_view(n, base[n]) for n in views if n in base}
    if len({view.dtype for view in views.values()}) != 1 or all(v.dim() == 0 for v in views.values()):
        return None
    layout = {
        "names": list(views),
        "ndims": [view.dim() for view in views.values()],
        "dims": [int(n) for view in views.values() for n in view.shape],
    }
    parts, rows, rows_sent = [], [], []
    with readonly_views():
        for name, view in views.items():
            changed = _changed_rows(view, base_views.get(name))
            rows_sent.append(-1 if changed is None else len(changed))
            if changed is None:
                parts.append(view.reshape(-1))
            else:
                parts.append(view[changed].reshape(-1))
                rows.append(changed)
        records = {FLAT_ARRAY_NAME: tensor_to_array("packed", torch.cat(parts), None)}
    if rows:
        layout.update(base=str(base_id), rows=rows_sent)
        records[ROWS_ARRAY_NAME] = tensor_to_array("rows", torch.cat(rows), None)
    return records, layout


def _changed_rows(view: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor | None:
    """The indices of the rows of a 2-D `view` that differ from `base`, when few enough to send
    them alone; None to send the whole tensor."""
    if base is None or view.dim() != 2 or base.shape != view.shape or base.dtype != view.dtype:
        return None
    changed = (view != base).any(dim=1).nonzero().reshape(-1)
    return changed if len(changed) <= MAX_CHANGED_ROWS_SHARE * view.shape[0] else None


def unpack_arrays(
    packed: Mapping[str, Array],
    layout: Mapping[str, list],
    bases: Mapping[str, Mapping[str, Array]] | None = None,
) -> ArrayRecord:
    """The arrays `pack_arrays` packed, as an ``ArrayRecord`` in their original order; tensors
    sent by rows are completed from the one of `bases` (weights the receiver holds, by Flower
    object id) that the layout names (`BaseNotHeldError` if none).

    The layout comes from the sender: it is checked whole (`_packed_shapes`, `_rows_sent`) before
    any value is read, and row indices before they are used, so a malformed one is a
    ``WeightsMismatchError``, never a crash or a wrong split.
    """
    names, shapes = _packed_shapes(layout)
    rows_sent = _rows_sent(layout, shapes)
    with readonly_views():
        indices = _row_indices(packed, rows_sent)  # first: it checks which arrays there are
        flat = decode_view("packed", packed[FLAT_ARRAY_NAME])
    if flat.dim() != 1:
        raise WeightsMismatchError(
            f"Received packed weights of shape {tuple(flat.shape)}; expected one flat array."
        )
    sizes = [math.prod(s) if n < 0 else n * s[1] for s, n in zip(shapes, rows_sent)]
    if sum(sizes) != flat.numel():
        raise WeightsMismatchError(
            f"Received {flat.numel()} packed values for a layout of {sum(sizes)}; the message is "
            "truncated or corrupt."
        )
    base = _named_base(layout, bases) if indices is not None else None
    out, offset, row_offset = ArrayRecord(), 0, 0
    with readonly_views():
        for name, shape, count, size in zip(names, shapes, rows_sent, sizes):
            values = flat[offset : offset + size]
            offset += size
            if count >= 0:
                rows = indices[row_offset : row_offset + count]
                row_offset += count
                values = _complete_rows(name, shape, values, rows, base)
            out[name] = tensor_to_array(name, values.reshape(shape), None)
    return out


def _rows_sent(layout: Mapping[str, list], shapes: list[tuple[int, ...]]) -> list[int]:
    """Per tensor, how many rows were sent alone (-1: the whole tensor), checked against shapes."""
    rows = layout.get("rows")
    if rows is None:
        return [-1] * len(shapes)
    valid = (
        isinstance(rows, list)
        and len(rows) == len(shapes)
        and all(
            type(n) is int and (n == -1 or (len(s) == 2 and 0 <= n <= s[0])) for n, s in zip(rows, shapes)
        )
        and isinstance(layout.get("base"), str)
    )
    if not valid:
        raise WeightsMismatchError(
            "Received packed weights with inconsistent row counts (one per tensor: -1, or at most "
            "the rows of a 2-D tensor, with the id of the weights they complete); the message is corrupt."
        )
    return rows


def _row_indices(packed: Mapping[str, Array], rows_sent: list[int]) -> torch.Tensor | None:
    """The indices of the rows sent alone, checked to be one int64 array of the right length."""
    expected_names = [FLAT_ARRAY_NAME] + ([ROWS_ARRAY_NAME] if any(n >= 0 for n in rows_sent) else [])
    if list(packed) != expected_names:
        raise WeightsMismatchError(
            f"Received packed arrays {list(packed)}, expected {expected_names}; the message is corrupt."
        )
    if len(expected_names) == 1:
        return None
    indices = decode_view("rows", packed[ROWS_ARRAY_NAME])
    if (
        indices.dtype != torch.int64
        or indices.dim() != 1
        or len(indices) != sum(n for n in rows_sent if n > 0)
    ):
        raise WeightsMismatchError(
            "Received row indices that are not one int64 array of one index per row sent; the "
            "message is corrupt."
        )
    return indices


def _named_base(layout: Mapping[str, list], bases: Mapping[str, Mapping[str, Array]] | None) -> Mapping:
    """The weights that packed rows complete: the one of `bases` the layout names."""
    base = (bases or {}).get(layout["base"])
    if base is None:
        raise BaseNotHeldError(
            f"Received rows of weights {layout['base'][:16]}..., which this receiver does not hold; only "
            "changes from weights the receiver holds can be sent by rows."
        )
    return base


def _complete_rows(
    name: str, shape: tuple[int, ...], values: torch.Tensor, rows: torch.Tensor, base: Mapping[str, Array]
) -> torch.Tensor:
    """A tensor of `shape`: `base`'s, with the `rows` sent replaced by `values`."""
    if name not in base:
        raise WeightsMismatchError(f"{name}: sent by rows, but the weights it refers to have no {name!r}.")
    full = decode_view(name, base[name])
    if tuple(full.shape) != shape or full.dtype != values.dtype:
        raise WeightsMismatchError(
            f"{name}: sent by rows as {values.dtype} {shape}, but the weights they complete hold "
            f"{full.dtype} {tuple(full.shape)}."
        )
    if len(rows) and not (rows[0] >= 0 and rows[-1] < shape[0] and bool((rows[1:] > rows[:-1]).all())):
        raise WeightsMismatchError(
            f"{name}: its row indices are not increasing indices below {shape[0]}; the message is corrupt."
        )
    full = full.clone()
    full[rows] = values.reshape(len(rows), shape[1])
    return full


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
    with readonly_views():
        for name, array in arrays.items():
            view = decode_view(name, array)
            out[name] = (
                tensor_to_array(name, view, dtype)
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
    with readonly_views():
        for name, array in arrays.items():
            if array.dtype in ("float16", "bfloat16"):
                out[name] = tensor_to_array(name, decode_view(name, array).float(), None)
            else:
                out[name] = array
    return out
