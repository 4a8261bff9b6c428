"""Tests for hf_flower.weights: state_dict <-> ArrayRecord, the trainable part, validation and dtypes."""

import io
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_bert
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from hf_flower.transport.wire import (
    FLAT_ARRAY_NAME,
    ROWS_ARRAY_NAME,
    BaseNotHeldError,
    pack_arrays,
    to_float32_arrays,
    unpack_arrays,
)
from hf_flower.weights import (
    NUMPY_STYPE,
    TORCH_RAW_STYPE,
    TRANSFER_DTYPES,
    NonFiniteWeightsError,
    WeightsMismatchError,
    arrays_nbytes,
    arrays_to_state_dict,
    decode_arrays,
    get_weights,
    set_weights,
    state_dict_to_arrays,
    validate_arrays,
)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """A synthetic state_dict covering every dtype and layout we promise to keep."""
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.half": torch.randn(5, generator=g).half(),
        "layer.double": torch.randn(2, 2, dtype=torch.float64, generator=g),
        "buffer.step": torch.tensor(7, dtype=torch.int64),  # 0-d scalar
        "buffer.ids": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "buffer.counts": torch.arange(-3, 3, dtype=torch.int32),
        "buffer.mask": torch.tensor([True, False, True]),
        "layer.transposed": torch.randn(3, 6, generator=g).t(),  # non-contiguous
        "layer.scalar": torch.tensor(0.25),
        "layer.grad": torch.randn(3, generator=g, requires_grad=True),
    }


def assert_state_dicts_equal(got, expected):
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor.detach()), name


def fedavg(records: list[ArrayRecord], num_examples: list[int]) -> ArrayRecord:
    """Aggregate exactly as Flower's FedAvg does (`value.numpy() * weight`, summed)."""
    contents = [
        RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": n})})
        for rec, n in zip(records, num_examples)
    ]
    return aggregate_arrayrecords(contents, "num-examples")


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_keeps_names_order_shapes_dtypes_and_values():
    state_dict = mixed_state_dict()
    arrays = state_dict_to_arrays(state_dict)

    assert list(arrays) == list(state_dict)
    back = arrays_to_state_dict(arrays, state_dict)
    assert_state_dicts_equal(back, state_dict)
    assert all(t.is_contiguous() for t in back.values())


def test_arrays_are_flowers_own_npy_format_never_pickled():
    state_dict = mixed_state_dict()
    arrays = state_dict_to_arrays(state_dict)
    for name, tensor in state_dict.items():
        arr = arrays[name]
        assert arr.stype == NUMPY_STYPE == "numpy.ndarray"
        expected = tensor.detach().contiguous().numpy()
        # Byte for byte what Flower's Array(ndarray) (np.save, allow_pickle=False) holds.
        assert arr.data == Array(expected).data, name
        assert arr.dtype == str(expected.dtype) and arr.shape == expected.shape
        loaded = np.load(io.BytesIO(arr.data), allow_pickle=False)
        assert loaded.dtype != object and np.array_equal(loaded, expected)


def test_interoperates_with_flowers_own_conversions():
    state_dict = mixed_state_dict()
    # Ours -> Flower's reader.
    flower_view = state_dict_to_arrays(state_dict).to_torch_state_dict()
    assert_state_dicts_equal(flower_view, {k: v.contiguous() for k, v in state_dict.items()})
    # Flower's writer -> ours.
    back = arrays_to_state_dict(ArrayRecord(state_dict), state_dict)
    assert_state_dicts_equal(back, state_dict)


def test_arrays_nbytes_counts_the_serialised_data():
    state_dict = mixed_state_dict()
    arrays = state_dict_to_arrays(state_dict)
    payload = sum(t.numel() * t.element_size() for t in state_dict.values())
    assert arrays_nbytes(arrays) == sum(len(a.data) for a in arrays.values())
    # Each .npy header is at most a few hundred bytes.
    assert payload < arrays_nbytes(arrays) < payload + 256 * len(state_dict)


# --- dtypes after aggregation ----------------------------------------------------------------


def test_integer_buffers_survive_fedavg_exactly():
    reference = {
        "ids": torch.arange(1000, dtype=torch.int64),
        "small": torch.arange(-50, 50, dtype=torch.int32),
        "mask": torch.tensor([True, False, True, True]),
        "step": torch.tensor(123456789, dtype=torch.int64),
        "weight": torch.linspace(-1, 1, 6),
    }
    arrays = state_dict_to_arrays(reference)
    averaged = fedavg([arrays, arrays, arrays], [1, 1, 1])

    # FedAvg really does hand back float64 approximations (e.g. 2.9999999999999996)...
    assert averaged["ids"].dtype == "float64"
    assert not np.array_equal(averaged["ids"].numpy(), reference["ids"].numpy())

    # ...which are rounded back, so identical integer buffers come back exactly.
    back = arrays_to_state_dict(averaged, reference)
    for name in ("ids", "small", "mask", "step"):
        assert back[name].dtype == reference[name].dtype
        assert torch.equal(back[name], reference[name]), name
    assert back["weight"].dtype == torch.float32
    torch.testing.assert_close(back["weight"], reference["weight"])


def test_hand_averaged_int64_comes_back_as_int64():
    x = torch.arange(0, 100, dtype=torch.int64)
    averaged = ArrayRecord({"x": Array(np.asarray(x.numpy() * 0.5 + x.numpy() * 0.5))})
    back = arrays_to_state_dict(averaged, {"x": x})
    assert back["x"].dtype == torch.int64
    assert torch.equal(back["x"], x)


def test_values_are_cast_to_the_reference_dtype():
    reference = {"w": torch.zeros(3, dtype=torch.float16)}
    arrays = ArrayRecord({"w": Array(np.array([0.5, 1.0, -2.0], dtype=np.float64))})
    back = arrays_to_state_dict(arrays, reference)
    assert back["w"].dtype == torch.float16
    assert back["w"].tolist() == [0.5, 1.0, -2.0]


def test_bfloat16_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    # Every finite bf16 bit pattern once, plus signed zeros, subnormals and a random matrix.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = bits[torch.isfinite(bits)]
    state_dict = {
        "all": finite,
        "m": torch.randn(7, 5, generator=g).bfloat16(),
        "s": torch.tensor(1.5).bfloat16(),
    }

    arrays = state_dict_to_arrays(state_dict)
    assert arrays["m"].stype == TORCH_RAW_STYPE and arrays["m"].dtype == "bfloat16"
    assert len(arrays["all"].data) == 2 * finite.numel()  # the raw payload, nothing else
    back = arrays_to_state_dict(arrays, state_dict)
    for name, tensor in state_dict.items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name].view(torch.int16), tensor.view(torch.int16)), name  # bits
    assert_state_dicts_equal(decode_arrays(arrays), state_dict)


def test_bfloat16_arrays_are_not_misread_by_flowers_numpy_reader():
    arrays = state_dict_to_arrays({"w": torch.ones(3)}, "bfloat16")
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        arrays["w"].numpy()


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_transfer_dtype_casts_floats_only_and_loads_back_into_the_model_dtype(dtype, itemsize):
    reference = {"w": torch.linspace(-1, 1, 1000), "ids": torch.arange(4)}
    arrays = state_dict_to_arrays(reference, dtype)
    assert arrays["ids"].dtype == "int64"
    assert len(arrays["w"].data) - 1000 * itemsize < 256  # at most an .npy header more
    back = arrays_to_state_dict(arrays, reference)
    assert back["w"].dtype == torch.float32 and torch.equal(back["ids"], reference["ids"])
    expected = reference["w"].to(TRANSFER_DTYPES[dtype]).float()
    assert torch.equal(back["w"], expected)  # exactly the wire value, upcast


def test_half_precision_is_averaged_in_float32():
    # Two float16 updates whose float16 average loses the low bits of the float32 one.
    a, b = torch.full((4,), 1.0009765625), torch.full((4,), 1.0)
    records = [to_float32_arrays(state_dict_to_arrays({"w": t}, "float16")) for t in (a, b)]
    assert all(r["w"].dtype == "float32" for r in records)
    averaged = fedavg(records, [1, 1])
    assert averaged["w"].dtype == "float32"
    assert float(averaged["w"].numpy()[0]) == pytest.approx(1.00048828125, abs=0)
    bf16 = to_float32_arrays(state_dict_to_arrays({"w": a}, "bfloat16"))
    assert bf16["w"].numpy().dtype == np.float32  # readable by Flower's strategies
    kept = state_dict_to_arrays({"w": a})
    assert to_float32_arrays(kept)["w"] is kept["w"]  # float32 passes through untouched


def test_float16_overflow_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"big: .*65504.*--transfer_dtype bfloat16"):
        state_dict_to_arrays({"big": torch.tensor([1e6])}, "float16")


def test_unknown_transfer_dtype_is_named():
    with pytest.raises(ValueError, match=r"Unknown transfer dtype 'fp8'.*float32"):
        state_dict_to_arrays({"w": torch.zeros(1)}, "fp8")


def test_truncated_raw_bfloat16_is_refused():
    arrays = state_dict_to_arrays({"w": torch.zeros(4, dtype=torch.bfloat16)})
    raw = arrays["w"]
    arrays["w"] = Array(dtype=raw.dtype, shape=raw.shape, stype=raw.stype, data=raw.data[:-2])
    with pytest.raises(WeightsMismatchError, match=r"w: received 6 bytes .*expected 8"):
        validate_arrays(arrays, {"w": torch.zeros(4)})


# --- the trainable part ----------------------------------------------------------------------


def test_frozen_weights_never_travel_and_stay_untouched():
    model = make_tiny_bert(seed=0)
    donor = make_tiny_bert(seed=1)
    for m in (model, donor):
        for p in m.bert.embeddings.parameters():
            p.requires_grad_(False)
    frozen_before = {k: v.clone() for k, v in model.bert.embeddings.state_dict().items()}

    arrays = get_weights(donor)
    trainable = [n for n, p in donor.named_parameters() if p.requires_grad]
    assert list(arrays) == trainable and not any(".embeddings." in n for n in arrays)
    full = sum(t.numel() * t.element_size() for t in donor.state_dict().values())
    assert arrays_nbytes(arrays) < full * 0.9

    set_weights(model, arrays)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(donor.named_parameters())[name]), name
    for name, value in model.bert.embeddings.state_dict().items():
        assert torch.equal(value, frozen_before[name]), name  # the frozen part is our own


def test_the_whole_model_does_not_fit_a_partly_frozen_one():
    model = make_tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    with pytest.raises(
        WeightsMismatchError,
        match=r"unexpected key 'bert\.embeddings\.word_embeddings\.weight'.*--freeze_modules",
    ):
        set_weights(model, state_dict_to_arrays(make_tiny_bert().state_dict()))


# --- set_weights -----------------------------------------------------------------------------


def test_set_weights_copies_in_place():
    model = make_tiny_bert(seed=0)
    donor = make_tiny_bert(seed=1)
    params_before = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    buffers_before = {name: b.data_ptr() for name, b in model.named_buffers()}
    assert not torch.equal(model.classifier.weight, donor.classifier.weight)

    set_weights(model, get_weights(donor))

    assert_state_dicts_equal(model.state_dict(), donor.state_dict())
    for name, p in model.named_parameters():
        assert p is params_before[name][0], name  # same Parameter object
        assert p.data_ptr() == params_before[name][1], name  # same storage, no reallocation
        assert p.requires_grad and p.dtype == torch.float32
    for name, b in model.named_buffers():
        assert b.data_ptr() == buffers_before[name], name


def test_set_weights_handles_tied_weights():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model, donor = Tied(), Tied()
    set_weights(model, get_weights(donor))
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, donor.embed.weight)


# --- errors ----------------------------------------------------------------------------------


def test_different_num_labels_names_the_key_and_both_shapes():
    model = make_tiny_bert(num_labels=2)
    arrays = get_weights(make_tiny_bert(num_labels=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(
        WeightsMismatchError,
        match=r"classifier\.weight: received shape \(3, 16\) but the model has \(2, 16\)"
        r".*num_labels",
    ):
        set_weights(model, arrays)
    assert_state_dicts_equal(model.state_dict(), before)  # untouched


def test_missing_key_is_named():
    reference = mixed_state_dict()
    arrays = state_dict_to_arrays(reference)
    del arrays["buffer.ids"]
    with pytest.raises(WeightsMismatchError, match=r"missing key 'buffer\.ids'.*different architecture"):
        arrays_to_state_dict(arrays, reference)


def test_unexpected_key_is_named():
    reference = mixed_state_dict()
    arrays = state_dict_to_arrays({**reference, "extra.bias": torch.zeros(2)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected key 'extra\.bias'") as info:
        validate_arrays(arrays, reference)
    assert "missing" not in str(info.value)


def test_nan_is_named_and_leaves_the_model_untouched():
    model = make_tiny_bert()
    state_dict = model.state_dict()
    poisoned = {k: v.clone() for k, v in state_dict.items()}
    poisoned["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    arrays = state_dict_to_arrays(poisoned)
    before = {k: v.clone() for k, v in state_dict.items()}

    match = r"bert\.encoder\.layer\.1\.output\.dense\.weight: .*NaN or inf.*diverged.*learning rate"
    with pytest.raises(NonFiniteWeightsError, match=match):
        validate_arrays(arrays, state_dict)
    with pytest.raises(NonFiniteWeightsError, match=match):
        set_weights(model, arrays)
    assert_state_dicts_equal(model.state_dict(), before)

    # Opting out converts anyway (e.g. to inspect a diverged update).
    back = arrays_to_state_dict(arrays, state_dict, check_finite=False)
    assert torch.isnan(back["bert.encoder.layer.1.output.dense.weight"]).any()


def test_inf_in_half_precision_is_caught():
    reference = {"h": torch.zeros(3, dtype=torch.float16)}
    arrays = state_dict_to_arrays({"h": torch.tensor([1.0, float("inf"), 0.0]).half()})
    with pytest.raises(NonFiniteWeightsError, match=r"^h: "):
        arrays_to_state_dict(arrays, reference)


def test_object_arrays_are_refused_not_unpickled():
    buffer = io.BytesIO()
    np.save(buffer, np.array([1, "a"], dtype=object), allow_pickle=True)  # hostile sender
    arrays = ArrayRecord({"w": Array(dtype="object", shape=(2,), stype=NUMPY_STYPE, data=buffer.getvalue())})
    with pytest.raises(WeightsMismatchError, match=r"w: .*not a readable numeric"):
        validate_arrays(arrays, {"w": torch.zeros(2)})


def test_truncated_data_is_refused():
    arrays = state_dict_to_arrays({"w": torch.zeros(4)})
    arrays["w"] = Array(dtype="float32", shape=(4,), stype=NUMPY_STYPE, data=arrays["w"].data[:-4])
    with pytest.raises(WeightsMismatchError, match=r"w: .*not a readable numeric .npy array"):
        validate_arrays(arrays, {"w": torch.zeros(4)})


def test_shape_is_read_from_the_data_not_the_metadata():
    arrays = state_dict_to_arrays({"w": torch.zeros(2, 3)})
    lying = arrays["w"]
    arrays["w"] = Array(dtype=lying.dtype, shape=(3, 2), stype=lying.stype, data=lying.data)
    match = r"w: received shape \(2, 3\) but the model has \(3, 2\)"
    with pytest.raises(WeightsMismatchError, match=match):
        validate_arrays(arrays, {"w": torch.zeros(3, 2)})


def test_non_tensor_values_are_refused():
    with pytest.raises(TypeError, match=r"w: expected a torch\.Tensor"):
        state_dict_to_arrays({"w": np.zeros(2)})


def test_fortran_ordered_arrays_from_other_senders_decode():
    # np.save (hence Flower's Array(ndarray)) keeps Fortran order for such arrays.
    data = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    arrays = ArrayRecord({"w": Array(data)})
    back = arrays_to_state_dict(arrays, {"w": torch.zeros(3, 4)})
    assert back["w"].is_contiguous()
    assert torch.equal(back["w"], torch.from_numpy(np.ascontiguousarray(data)))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_packed_weights_unpack_to_exactly_what_was_packed(dtype):
    arrays = get_weights(make_tiny_bert(), dtype)
    packed, layout = pack_arrays(arrays)
    assert list(packed) == [FLAT_ARRAY_NAME]
    assert packed[FLAT_ARRAY_NAME].shape == (sum(math.prod(a.shape) for a in arrays.values()),)
    assert_same_bytes(unpack_arrays(packed, layout), arrays)


def assert_same_bytes(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got) == list(expected)
    for name, array in expected.items():
        assert (got[name].dtype, got[name].shape, got[name].stype) == (array.dtype, array.shape, array.stype)
        assert got[name].data == array.data, name


def test_mixed_dtypes_are_not_packed():
    arrays = state_dict_to_arrays({"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float16)})
    assert pack_arrays(arrays) is None


def test_packed_weights_with_a_wrong_layout_are_refused():
    packed, layout = pack_arrays(state_dict_to_arrays({"a": torch.ones(3), "b": torch.ones(2, 2)}))
    with pytest.raises(WeightsMismatchError, match="truncated or corrupt"):
        unpack_arrays(packed, {**layout, "dims": [3, 2, 3]})
    with pytest.raises(WeightsMismatchError, match="inconsistent layout"):
        unpack_arrays(packed, {**layout, "ndims": [1]})


# --- Rows that training left as they were stay out of the reply -------------------------------


def trained_from(base: dict[str, torch.Tensor], changed_rows: list[int]) -> dict[str, torch.Tensor]:
    """`base` after a round that moved the bias, the dense matrix, and a few embedding rows."""
    trained = {name: tensor.clone() for name, tensor in base.items()}
    trained["embeddings"][changed_rows] += 0.5
    trained["dense"] += 0.25
    trained["bias"] -= 1.0
    return trained


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_rows_left_as_they_were_are_not_sent_and_come_back_exactly(dtype):
    torch.manual_seed(0)
    base = {"embeddings": torch.randn(40, 6), "dense": torch.randn(6, 6), "bias": torch.randn(6)}
    base_arrays = state_dict_to_arrays(base, dtype)
    trained = state_dict_to_arrays(trained_from(base, [3, 17, 39]), dtype)

    packed, layout = pack_arrays(trained, base_arrays.object_id, base_arrays)

    # The embeddings go as their 3 changed rows; the dense matrix changed everywhere: whole.
    assert layout["rows"] == [3, -1, -1] and layout["base"] == base_arrays.object_id
    assert packed[ROWS_ARRAY_NAME].numpy().tolist() == [3, 17, 39]
    assert packed[FLAT_ARRAY_NAME].shape == (3 * 6 + 36 + 6,)
    assert_same_bytes(unpack_arrays(packed, layout, {base_arrays.object_id: base_arrays}), trained)


def test_rows_need_the_weights_they_were_taken_from():
    base = {"embeddings": torch.zeros(8, 2)}
    base_arrays = state_dict_to_arrays(base)
    packed, layout = pack_arrays(
        state_dict_to_arrays(trained_from({**base, "dense": torch.zeros(2, 2), "bias": torch.zeros(2)}, [1])),
        base_arrays.object_id,
        base_arrays,
    )
    other = state_dict_to_arrays({"embeddings": torch.ones(8, 2)})
    with pytest.raises(BaseNotHeldError, match="which this receiver does not hold"):
        unpack_arrays(packed, layout, {other.object_id: other})
    with pytest.raises(BaseNotHeldError, match="which this receiver does not hold"):
        unpack_arrays(packed, layout)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p, layout: (p, {**layout, "rows": [9, -1, -1]}), "inconsistent row counts"),
        (lambda p, layout: (p, {**layout, "rows": [2, 1, -1]}), "one index per row"),
        (lambda p, layout: (p, {**layout, "rows": [2, -1, 1]}), "inconsistent row counts"),  # a 1-D bias
        (lambda p, layout: (p, {**layout, "rows": [2, -1]}), "inconsistent row counts"),
        (lambda p, layout: (p, {**layout, "base": 7}), "inconsistent row counts"),
        (lambda p, layout: ({FLAT_ARRAY_NAME: p[FLAT_ARRAY_NAME]}, layout), "expected \\['flat', 'rows'\\]"),
        (lambda p, layout: ({**p, ROWS_ARRAY_NAME: Array(np.array([5, 1]))}, layout), "not increasing"),
        (lambda p, layout: ({**p, ROWS_ARRAY_NAME: Array(np.array([1, 1]))}, layout), "not increasing"),
        (lambda p, layout: ({**p, ROWS_ARRAY_NAME: Array(np.array([1, 8]))}, layout), "not increasing"),
        (lambda p, layout: ({**p, ROWS_ARRAY_NAME: Array(np.array([-1, 2]))}, layout), "not increasing"),
        (lambda p, layout: ({**p, ROWS_ARRAY_NAME: Array(np.array([1]))}, layout), "one index per row"),
        (
            lambda p, layout: ({**p, ROWS_ARRAY_NAME: Array(np.array([1.0, 2.0]))}, layout),
            "one index per row",
        ),
    ],
)
def test_malformed_rows_are_refused(corrupt, match):
    base = {"embeddings": torch.zeros(8, 2), "dense": torch.zeros(2, 2), "bias": torch.zeros(2)}
    base_arrays = state_dict_to_arrays(base)
    packed, layout = pack_arrays(
        state_dict_to_arrays(trained_from(base, [1, 6])), base_arrays.object_id, base_arrays
    )
    assert layout["rows"] == [2, -1, -1]
    packed, layout = corrupt(dict(packed), dict(layout))
    with pytest.raises(WeightsMismatchError, match=match):
        unpack_arrays(packed, layout, {base_arrays.object_id: base_arrays})


def test_trainers_defaults_leave_the_rows_of_unseen_tokens_exactly_as_they_were():
    """What makes rows worth leaving out: AdamW without weight decay (Trainer's default) does not
    move an embedding row whose token no batch held."""
    model = make_tiny_bert()
    before = model.get_input_embeddings().weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        model(input_ids=torch.tensor([[1, 5, 7, 2]]), labels=torch.tensor([1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero().reshape(-1).tolist()
    assert changed == [1, 2, 5, 7]
