"""The weights of a message as one flat array, between the server and long-lived clients.

Flower moves each ``Array`` of a message as separate objects, one request per object on every
hop (ServerApp -> SuperLink -> SuperNode -> client, and back). A model's hundred-odd tensors
cost more in requests than in bytes: for MiniLM, halving the bytes (bfloat16) cut a round's
overhead by 5% only, while one flat array turns 219 objects into 20. `pack` replaces a message's `arrays`
record by the flat array and its layout; `unpack` restores it exactly, so strategies, mods and
the ClientApp only ever see ordinary per-tensor records.

The server packs only for clients that have said they unpack (`scripts/client.py`, see
`server_app.TrackingGrid`); replies are unpacked whenever they arrive packed.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from .constants import ARRAYS_KEY, PACKED_ARRAYS_KEY, PACKED_LAYOUT_KEY
from .weights import pack_arrays, unpack_arrays

FLAT_ARRAY_NAME = "flat"


def packed_records(arrays: ArrayRecord) -> dict | None:
    """The records that stand for `arrays` on the wire: one flat array and its layout.

    None when the arrays cannot be packed (`weights.pack_arrays`). Messages that carry the same
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
