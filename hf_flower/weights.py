"""The one get/set pair: a model's trainable weights <-> a Flower ``ArrayRecord``.

Everything that crosses the wire as model weights goes through here, in both directions, so
that names, order, shapes and dtypes survive exactly and a message that does not fit the model
fails loudly, naming the key and the likely fix, before any weight is touched.

What travels is the model's *trainable* part only (parameters with ``requires_grad``): frozen
weights (a PEFT base model, `--freeze_modules`) and buffers never change in training, and server
and clients both hold them from the moment they build the model.

Wire formats:

- every dtype numpy has is stored the way Flower itself stores arrays (``stype ==
  "numpy.ndarray"``: the ``.npy`` format, byte for byte what ``np.save`` writes), so Flower's
  strategies, ``Array.numpy()`` and ``ArrayRecord.to_torch_state_dict()`` read what we write;
- bfloat16, which numpy lacks, is stored as its raw 2-byte little-endian payload with
  ``stype == "torch.raw"`` and ``dtype == "bfloat16"``. Flower's ``Array.numpy()`` refuses that
  stype instead of silently reading the bits as integers; the server turns such arrays into
  float32 (`transport.wire.to_float32_arrays`) before a strategy averages them.

A ``transfer_dtype`` casts floating-point tensors for the wire only: the receiver copies values
into tensors of its model's own dtype. Nothing is ever pickled or unpickled: object arrays are
refused in both directions.

This module knows nothing of processes or of Flower's runtime beyond ``Array`` and
``ArrayRecord``. The packed wire format and the running mean (`transport/`) are built on its
encoding.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format

# Flower's name for the `.npy` serialisation (`SType.NUMPY` in Flower's constants).
NUMPY_STYPE = "numpy.ndarray"
# Raw little-endian bytes of a torch dtype numpy lacks, named by `Array.dtype`.
TORCH_RAW_STYPE = "torch.raw"
_RAW_DTYPES = {"bfloat16": torch.bfloat16}

# `--transfer_dtype` choices: what floating-point weights are cast to on the wire.
TRANSFER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Received dtype kinds we decode: bool, signed/unsigned int, float, complex. Anything else
# (objects, strings, structs) is not model weights, and objects would need unpickling.
_ACCEPTED_KINDS = frozenset("biufc")

_ARCHITECTURE_HINT = (
    "The sender likely built a different architecture, a different number of labels or a "
    "different trainable part (e.g. server and client built from different models, `num_labels`, "
    "`--peft` or `--freeze_modules`); build both from the same run configuration."
)


class WeightsMismatchError(ValueError):
    """Received arrays do not fit the model: different keys, shapes, or unreadable data."""


class NonFiniteWeightsError(ValueError):
    """Received arrays hold NaN or inf: the sender's training diverged."""


class WeightsOutOfRangeError(ValueError):
    """Received arrays hold values beyond the bound the receiver accepts."""


def transfer_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a `--transfer_dtype` name (None keeps each tensor's own dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in TRANSFER_DTYPES:
        raise ValueError(f"Unknown transfer dtype {name!r}; choose one of {list(TRANSFER_DTYPES)}.")
    return TRANSFER_DTYPES[name]


# ---------------------------------------------------------------------------------------------
# model / state_dict -> ArrayRecord
# ---------------------------------------------------------------------------------------------


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters (``requires_grad``) by name, as detached views.

    This is what travels between server and clients. Tied parameters appear once, under their
    first name; frozen parameters and buffers are left out (both sides already hold them).
    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def state_dict_to_arrays(
    state_dict: Mapping[str, torch.Tensor], dtype: str | torch.dtype | None = None
) -> ArrayRecord:
    """Convert a ``state_dict`` into an ``ArrayRecord``, keeping names, order and shapes.

    With ``dtype`` (a `TRANSFER_DTYPES` name or torch dtype), floating-point tensors are cast
    to it for the wire; integer and bool tensors keep theirs. Without it every dtype is kept.
    Each tensor is moved to CPU and serialised with one copy (`.npy` bytes, or raw bytes for
    bfloat16): about the cost of copying the weights into new memory
    (`benchmarks/weights_conversion.py`).
    """
    dtype = transfer_dtype(dtype)
    record = ArrayRecord()
    for name, tensor in state_dict.items():
        record[name] = tensor_to_array(name, tensor, dtype)
    return record


def get_weights(model: torch.nn.Module, dtype: str | torch.dtype | None = None) -> ArrayRecord:
    """The model's trainable weights as an ``ArrayRecord`` (floats cast to ``dtype`` if given)."""
    return state_dict_to_arrays(trainable_state_dict(model), dtype)


def tensor_to_array(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> Array:
    """Serialise one tensor: `.npy` bytes (Flower's format), or raw bytes for bfloat16."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor, got {type(tensor).__name__}. Pass a model's "
            "`state_dict()` (or use `get_weights(model)`)."
        )
    tensor = tensor.detach()
    if dtype is not None and tensor.dtype.is_floating_point and tensor.dtype != dtype:
        cast = tensor.to("cpu", dtype)
        if dtype == torch.float16 and _overflows(tensor, cast):
            raise ValueError(
                f"{name}: values beyond float16's range (65504) would become inf on the wire. "
                "Use --transfer_dtype bfloat16 (float32's range) or float32."
            )
        tensor = cast
    # resolve_conj/neg: lazy conjugate/negative views have no numpy equivalent.
    tensor = tensor.cpu().resolve_conj().resolve_neg().contiguous()
    if tensor.dtype == torch.bfloat16:
        # One copy: the tensor's own bytes, read through a uint8 view.
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return Array(dtype="bfloat16", shape=tuple(tensor.shape), stype=TORCH_RAW_STYPE, data=data)
    try:
        array = tensor.numpy()
    except (TypeError, RuntimeError) as err:
        raise TypeError(
            f"{name}: cannot convert a {tensor.dtype} tensor on {tensor.device} to numpy "
            f"({err}). Send floating-point, integer or bool tensors with real data."
        ) from err
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(array))
    # join() reads the contiguous array through the buffer protocol: one copy, no tobytes().
    data = b"".join((header.getvalue(), array))
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=NUMPY_STYPE, data=data)


def _overflows(source: torch.Tensor, cast: torch.Tensor) -> bool:
    """Whether casting made finite values infinite (only checked when the cast produced an inf)."""
    if not torch.isinf(cast).any():
        return False
    return bool((torch.isinf(cast) & torch.isfinite(source.cpu())).any())


# ---------------------------------------------------------------------------------------------
# ArrayRecord -> state_dict / model
# ---------------------------------------------------------------------------------------------


def validate_arrays(
    arrays: Mapping[str, Array],
    reference: Mapping[str, torch.Tensor],
    check_finite: bool = True,
    dtype: str | torch.dtype | None = None,
    max_magnitude: float | None = None,
) -> None:
    """Check that ``arrays`` fit ``reference`` (e.g. `trainable_state_dict(model)`).

    Checks, in this order: the same keys; the same shapes (the first differing key in the
    reference's order is named); with ``dtype`` (a `TRANSFER_DTYPES` name), exactly that dtype
    for the reference's floating-point tensors and the reference's own dtype for the others;
    with ``check_finite``, no NaN/inf in float arrays; with ``max_magnitude``, no value beyond
    it. Shapes, dtypes and values are read from the array bytes themselves, not only from the
    metadata next to them.

    Raises ``WeightsMismatchError``, ``NonFiniteWeightsError`` or ``WeightsOutOfRangeError``;
    returns nothing when fine.
    """
    _decode_all(arrays, reference, check_finite, transfer_dtype(dtype), max_magnitude)


def update_norm(arrays: Mapping[str, Array], start: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``arrays - start`` over all tensors: how far an update moved the weights.

    ``arrays`` must already be validated against ``start`` (same keys and shapes). Each tensor is
    read in place from the message bytes; only one tensor's difference exists at a time.
    """
    total = 0.0
    with readonly_views():
        for name, base in start.items():
            difference = decode_view(name, arrays[name]).float() - base.float()
            total += float(torch.linalg.vector_norm(difference)) ** 2
    return math.sqrt(total)


def arrays_to_state_dict(
    arrays: Mapping[str, Array],
    reference: Mapping[str, torch.Tensor],
    check_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Validate ``arrays`` against ``reference``, then convert them into a new ``state_dict``.

    Keys come back in the reference's order and each tensor gets the reference's dtype (on CPU).
    Integer and bool buffers that a strategy averaged into floats (Flower's FedAvg computes
    ``value.numpy() * weight``, which gives float64) are rounded before the cast, so identical
    integer buffers come back exactly.
    """
    decoded = _decode_all(arrays, reference, check_finite)
    return {name: _cast(decoded[name], ref.dtype).contiguous() for name, ref in reference.items()}


def set_weights(model: torch.nn.Module, arrays: Mapping[str, Array]) -> None:
    """Validate ``arrays`` against the model's trainable part, then copy them in place.

    Everything is validated before the first copy, so a bad message leaves the model untouched.
    Each value is copied once, straight from the message bytes into the parameter (converting
    from the wire dtype to the parameter's own). Parameters keep their identity, device and
    dtype (no reallocation, optimizer references stay valid).
    """
    targets = trainable_state_dict(model)  # detached views sharing storage with the model
    decoded = _decode_all(arrays, targets, check_finite=True)
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(_cast(decoded[name], target.dtype, copy=False))


def decode_arrays(arrays: Mapping[str, Array]) -> dict[str, torch.Tensor]:
    """The tensors as sent (the wire dtype, bfloat16 included), as new CPU tensors.

    For passing a message's weights on unchanged (e.g. to the other ranks of a client); use
    `set_weights` or `arrays_to_state_dict` to load them into a model.
    """
    with readonly_views():
        return {
            name: decode_view(name, array).clone(memory_format=torch.contiguous_format)
            for name, array in arrays.items()
        }


def arrays_nbytes(arrays: Mapping[str, Array]) -> int:
    """Total bytes of serialised array data (what goes on the wire, ``.npy`` headers included).

    The same sum Flower logs as the ArrayRecord's size; unlike ``ArrayRecord.count_bytes()``
    it leaves out the key names.
    """
    return sum(len(array.data) for array in arrays.values())


def _decode_all(
    arrays: Mapping[str, Array],
    reference: Mapping[str, torch.Tensor],
    check_finite: bool,
    dtype: torch.dtype | None = None,
    max_magnitude: float | None = None,
) -> dict[str, torch.Tensor]:
    """Validate ``arrays`` against ``reference`` and return read-only tensor views of them
    (``dtype`` and ``max_magnitude``: see `validate_arrays`)."""
    _check_keys(arrays, reference)
    with readonly_views():
        decoded = {name: decode_view(name, arrays[name]) for name in reference}
    for name, ref in reference.items():
        received, expected = tuple(decoded[name].shape), tuple(ref.shape)
        if received != expected:
            raise WeightsMismatchError(
                f"{name}: received shape {received} but the model has {expected}. " + _ARCHITECTURE_HINT
            )
    if dtype is not None:
        for name, ref in reference.items():
            expected = dtype if ref.dtype.is_floating_point else ref.dtype
            if decoded[name].dtype != expected:
                raise WeightsMismatchError(
                    f"{name}: received {decoded[name].dtype} values, expected {expected} (the run's "
                    "--transfer_dtype for floating-point weights). Run the sender with this run's "
                    "configuration."
                )
    if check_finite:
        for name in reference:
            view = decoded[name]
            if not _all_finite(view):
                raise NonFiniteWeightsError(
                    f"{name}: received array holds NaN or inf, so the sender's update "
                    "diverged. Lower the learning rate, check the data (inputs and labels), "
                    "or clip gradients (`max_grad_norm`)."
                )
    if max_magnitude is not None:
        for name in reference:
            largest = _max_magnitude(decoded[name])
            if not largest <= max_magnitude:
                raise WeightsOutOfRangeError(
                    f"{name}: received a value of magnitude {largest:.3g}, beyond the {max_magnitude:g} "
                    "accepted; the sender's update diverged or was crafted."
                )
    return decoded


def _max_magnitude(view: torch.Tensor) -> float:
    """The largest absolute value of a tensor (NaN if it holds one), in one read pass."""
    if view.numel() == 0:
        return 0.0
    if view.dtype.is_complex:
        return float(view.abs().max())
    low, high = torch.aminmax(view if view.dtype != torch.bool else view.to(torch.uint8))
    low, high = float(low), float(high)
    return float("nan") if math.isnan(low) or math.isnan(high) else max(-low, high)


def _all_finite(view: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or inf (integers always do).

    Via min and max, which propagate NaN: one read pass and no temporary, 10-20x faster than
    ``torch.isfinite(view).all()``, which allocates a bool tensor as large as the weights.
    """
    if view.numel() == 0 or not (view.dtype.is_floating_point or view.dtype.is_complex):
        return True
    if view.dtype.is_complex:
        return bool(torch.isfinite(view).all())
    low, high = torch.aminmax(view)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_keys(arrays: Mapping[str, Array], reference: Mapping[str, torch.Tensor]) -> None:
    """Raise ``WeightsMismatchError`` naming the first missing and first unexpected key."""
    missing = [name for name in reference if name not in arrays]
    unexpected = [name for name in arrays if name not in reference]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing key {missing[0]!r}" + _and_more(missing))
    if unexpected:
        parts.append(f"unexpected key {unexpected[0]!r}" + _and_more(unexpected))
    raise WeightsMismatchError(
        "Received arrays do not fit the model: " + "; ".join(parts) + ". " + _ARCHITECTURE_HINT
    )


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


class readonly_views(warnings.catch_warnings):
    """Silence torch's warning about tensors over read-only message bytes: we never write them."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message=".*(not writable|non-writable).*", category=UserWarning)


def decode_view(name: str, array: Array) -> torch.Tensor:
    """Return a zero-copy tensor view of an ``Array``'s bytes (never to be written to).

    Reads `.npy` headers with numpy's own reader but never ``np.load``: no copy of the data,
    and object arrays (which would need unpickling) are refused outright.
    """
    if not isinstance(array, Array):
        raise TypeError(
            f"{name}: expected a flwr.app.Array, got {type(array).__name__}. Pass the "
            "ArrayRecord received in the message (or build one with `state_dict_to_arrays`)."
        )
    if array.stype == TORCH_RAW_STYPE:
        return _decode_raw(name, array)
    if array.stype != NUMPY_STYPE:
        raise WeightsMismatchError(
            f"{name}: received serialisation {array.stype!r}, expected {NUMPY_STYPE!r} or "
            f"{TORCH_RAW_STYPE!r}. Send weights built with `get_weights` / `state_dict_to_arrays`."
        )
    try:
        stream = io.BytesIO(array.data)
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        if dtype.hasobject or dtype.kind not in _ACCEPTED_KINDS:
            raise ValueError(f"dtype {dtype} is not numeric")
        # Fortran-ordered data is stored with its shape reversed, then transposed back.
        stored_shape = shape[::-1] if fortran_order else shape
        flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
        view = flat.reshape(stored_shape)
        return torch.from_numpy(view.T if fortran_order else view)
    except (ValueError, TypeError) as err:
        raise WeightsMismatchError(
            f"{name}: received array data is not a readable numeric .npy array ({err}). "
            "Send weights built with `get_weights` / `state_dict_to_arrays`."
        ) from err


def _decode_raw(name: str, array: Array) -> torch.Tensor:
    """A tensor view of raw bytes whose dtype and shape only the metadata gives."""
    dtype = _RAW_DTYPES.get(array.dtype)
    shape = tuple(array.shape)
    if dtype is None or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WeightsMismatchError(
            f"{name}: received raw array of dtype {array.dtype!r} and shape {shape}; only "
            f"{list(_RAW_DTYPES)} travel raw. Send weights built with `get_weights`."
        )
    count = math.prod(shape)
    if len(array.data) != count * dtype.itemsize:
        raise WeightsMismatchError(
            f"{name}: received {len(array.data)} bytes of {array.dtype} data for shape {shape} "
            f"(expected {count * dtype.itemsize}); the message is truncated or corrupt."
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(array.data, dtype=dtype, count=count).reshape(shape)


def _cast(view: torch.Tensor, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
    """``view`` in ``dtype``: a new tensor (``copy``), or anything ``Tensor.copy_`` can read."""
    integral = not (dtype.is_floating_point or dtype.is_complex)
    if integral and (view.dtype.is_floating_point or view.dtype.is_complex):
        # Averaged integer/bool buffers arrive as floats (e.g. 2.9999999 for 3); a plain
        # cast would truncate, so round to the nearest integer first.
        return torch.round(view.real if view.dtype.is_complex else view).to(dtype)
    if not copy:
        return view
    # Views over the message bytes are read-only; a new tensor owns its memory.
    return view.to(dtype, copy=True)
