"""The packed format: bit packing against hand-worked bytes, a hand-counted ledger, the file size on
disk, and a bitwise round trip of a whole model through the loader."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from qbert.errors import QbertError
from qbert.models import load_model, resolve_model
from qbert.quant.gobo import quantize_matrix
from qbert.quant.packing import (
    FORMAT,
    load_packed,
    pack_bits,
    position_bits,
    read_packed,
    unpack_bits,
    write_packed,
)


def test_pack_bits_matches_hand_worked_bytes():
    # 3-bit values 1,2,3,4,5 -> LSB-first stream 100 010 110 001 101 (+ one zero pad bit)
    # byte 0 = bits 1,0,0,0,1,0,1,1 (LSB first) = 1 + 16 + 64 + 128 = 209; byte 1 = 0,0,0,1,1,0,1,0 = 88
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3, 4, 5]), 3), np.array([209, 88], dtype=np.uint8))
    # 4-bit values: low nibble first
    np.testing.assert_array_equal(pack_bits(np.array([0x1, 0xF, 0x3]), 4), np.array([0xF1, 0x03], dtype=np.uint8))
    # 2-bit values 3,0,1,2 -> 11 00 10 01 -> byte = 0b10_01_00_11 = 0x93
    np.testing.assert_array_equal(pack_bits(np.array([3, 0, 1, 2]), 2), np.array([0x93], dtype=np.uint8))


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 11, 22, 40])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=1_100_003, dtype=np.int64)  # crosses a 2^20-value chunk
    packed = pack_bits(values, bits)
    assert packed.size == (values.size * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, values.size).astype(np.int64), values)


def test_pack_bits_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(np.array([8]), 3)


def test_position_bits():
    assert [position_bits(n) for n in (1, 2, 3, 64, 65, 70, 589_824, 2**24)] == [1, 1, 2, 6, 7, 7, 20, 24]


class _Config:
    def to_json_string(self) -> str:
        return json.dumps({"model_type": "bert"})


class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.dense = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.dense.weight.copy_(weight)
            self.dense.bias.copy_(bias)
        self.config = _Config()


def test_hand_counted_ledger_and_file_size(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((10, 7)) * 0.05).astype(np.float32)
    w[2, 3], w[9, 6] = 1.0, -1.5  # two planted outliers
    code, _ = quantize_matrix(w, 3)
    assert code.outliers == 2 and sorted(code.outlier_positions.tolist()) == [2 * 7 + 3, 9 * 7 + 6]
    model = OneLayer(torch.from_numpy(w), torch.zeros(10))
    path = tmp_path / "m.safetensors"
    ledger = write_packed(path, model, {"dense.weight": code})
    # counted by hand: 68 Gaussian-group weights x 3 bits = 204 bits, padded to 26 bytes (4 bits);
    # 8 centroids x 32; 2 outliers x 32 (values) and x 7 bits (70 positions need 7) = 14, padded to 16;
    # the 10-float bias = 320 bits
    assert ledger.bits["indices"] == 204 and ledger.bits["index_padding"] == 4
    assert ledger.bits["codebooks"] == 256
    assert ledger.bits["outlier_values"] == 64
    assert ledger.bits["outlier_positions"] == 14 and ledger.bits["position_padding"] == 2
    assert ledger.bits["unquantized"] == 320
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert ledger.bits["header"] == 8 * (8 + header_len)
    payload = 26 + 32 + 8 + 2 + 40
    assert len(raw) == 8 + header_len + payload == ledger.file_bytes
    assert ledger.total_bits == 8 * len(raw)
    assert ledger.fp32_bytes == 4 * (70 + 10)
    assert ledger.compression == pytest.approx(ledger.fp32_bytes / len(raw))
    assert ledger.coded_compression == pytest.approx(70 * 32 / (208 + 256 + 64 + 16))
    decoded = read_packed(path).tensors["dense.weight"]
    np.testing.assert_array_equal(decoded, code.decode())


def tiny_gobo_model(bits: int = 3):
    torch.manual_seed(0)
    model = load_model(resolve_model("tiny-random"), "classification", 3).eval()
    codes = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".weight") and param.dim() == 2:
                code, _ = quantize_matrix(param.numpy(), bits)
                param.copy_(torch.from_numpy(code.decode()))
                codes[name] = code
    return model, codes


def test_round_trip_is_bitwise_exact(tmp_path):
    model, codes = tiny_gobo_model(bits=4)
    path = tmp_path / "model.safetensors"
    ledger = write_packed(path, model, codes)
    assert path.stat().st_size == ledger.file_bytes and ledger.total_bits == 8 * ledger.file_bytes
    loaded = load_packed(path)
    assert type(loaded).__name__ == "BertForSequenceClassification" and loaded.num_labels == 3
    original = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, original[name]), name
    ids = torch.tensor([[101, 2023, 2003, 102]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # the embeddings (three tables, ~2M weights) dominate tiny-random: about 32/4 smaller
    assert 7.0 < ledger.compression < 8.0


def test_reading_a_foreign_safetensors_file_fails_clearly(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(path))
    with pytest.raises(QbertError, match=f"not a qbert packed file.*{FORMAT}"):
        read_packed(path)


def _rewrite(path, out, tensors=None, metadata=None, checksum=True):
    """Copy a packed file with some tensors or metadata changed (the checksum recomputed unless not)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from qbert.quant.fileformat import CHECKSUM_KEY, tensors_checksum

    with safe_open(str(path), framework="np") as f:
        meta, raw = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    raw.update(tensors or {})
    meta.update(metadata or {})
    if checksum:
        meta[CHECKSUM_KEY] = tensors_checksum(raw)
    save_file(raw, str(out), metadata=meta)
    return out


def _flip(array, index=0):
    array = array.copy()
    array.reshape(-1).view(np.uint8)[index] ^= 0xFF
    return array


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model, codes = tiny_gobo_model(bits=3)
    path = tmp_path_factory.mktemp("packed") / "model.safetensors"
    write_packed(path, model, codes)
    name = max(codes, key=lambda n: codes[n].outliers)
    assert codes[name].outliers >= 2
    return path, name, codes[name]


def test_a_damaged_packed_file_is_refused_in_one_line(packed, tmp_path):
    """Every kind of damage is caught before a model is built: a flipped byte (checksum), and with the checksum
    recomputed, metadata that disagrees with the data, non-finite or unsorted values, a foreign class name."""
    from safetensors import safe_open

    from qbert.errors import QbertError

    path, name, code = packed
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata())
        raw = {k: f.get_tensor(k) for k in f.keys()}
    codes = json.loads(meta["codes"])
    config = json.loads(meta["config"])
    two_bits = {**codes, name: {**codes[name], "bits": 2}}
    unsorted = pack_bits(code.outlier_positions[::-1].copy(), codes[name]["position_bits"])
    nan_codebook = raw[f"{name}.gobo_codebook"].copy()
    nan_codebook[3] = np.nan
    cases = {
        "flip index byte": (dict(tensors={f"{name}.gobo_indices": _flip(raw[f"{name}.gobo_indices"], 5)},
                                 checksum=False), "do not match the file's checksum"),
        "flip codebook byte": (dict(tensors={f"{name}.gobo_codebook": _flip(raw[f"{name}.gobo_codebook"], 2)},
                                    checksum=False), "do not match the file's checksum"),
        "bits 3 -> 2": (dict(metadata={"codes": json.dumps(two_bits)}), "index bytes for"),
        "NaN centroid": (dict(tensors={f"{name}.gobo_codebook": nan_codebook}), "not finite"),
        "unsorted codebook": (dict(tensors={f"{name}.gobo_codebook": raw[f"{name}.gobo_codebook"][::-1].copy()}),
                              "not in ascending order"),
        "unsorted positions": (dict(tensors={f"{name}.gobo_outlier_positions": unsorted}), "not ascending"),
        "missing tensor": (dict(metadata={"codes": json.dumps({**codes, "x.weight": codes[name]})}),
                           "tensor x.weight.gobo_indices is missing"),
        "codes not JSON": (dict(metadata={"codes": "{"}), "metadata 'codes' is not valid JSON"),
        "foreign class": (dict(metadata={"config": json.dumps({**config, "architectures": ["AutoTokenizer"]})}),
                          "architecture 'AutoTokenizer' is not one qbert writes"),
    }
    for label, (change, expected) in cases.items():
        damaged = _rewrite(path, tmp_path / f"{label}.safetensors", **change)
        with pytest.raises(QbertError, match=expected) as caught:
            load_packed(damaged)
        assert str(damaged) in str(caught.value) and "\n" not in str(caught.value), label
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(QbertError, match="not a readable safetensors file"):
        load_packed(tmp_path / "truncated.safetensors")
    assert load_packed(_rewrite(path, tmp_path / "same.safetensors")) is not None  # an untouched copy loads


def test_reported_matrix_bytes_are_the_packed_files(packed):
    """The recipe's per-matrix size (recipes/gobo.py coded_bytes) is the bytes that matrix takes in the file,
    read from the file's own tensors; the hand-counted 10x7 case of the ledger test above too."""
    from safetensors import safe_open

    from recipes.gobo import coded_bytes

    path, name, code = packed
    with safe_open(str(path), framework="np") as f:
        stored = sum(f.get_tensor(f"{name}{suffix}").nbytes for suffix in
                     (".gobo_indices", ".gobo_codebook", ".gobo_outlier_values", ".gobo_outlier_positions"))
    assert coded_bytes(code.numel, code.bits, code.outliers) == stored
    assert coded_bytes(70, 3, 2) == 26 + 32 + 8 + 2
