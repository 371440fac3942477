"""The packed format: bit packing against hand-worked bytes, a hand-counted ledger, the file size on
disk, and a bitwise round trip of a whole model through the loader."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

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
    with pytest.raises(ValueError, match=f"not a qbert packed file.*{FORMAT}"):
        read_packed(path)
