import pytest
import torch
from safetensors.torch import load_file, save_file

from blockdiff.merge import MergeError, merge_checkpoints, select_top_k


def _ckpt(path, value, extra=None, shape=(2, 3), dtype=torch.float32, config='{"hidden_size": 2}'):
    path.mkdir()
    weights = {"a": torch.full(shape, float(value), dtype=dtype), "b": torch.full((4,), 2.0 * value)}
    weights.update(extra or {})
    save_file(weights, path / "model.safetensors")
    (path / "config.json").write_text(config)
    (path / "tag.txt").write_text(str(value))
    return path


def test_top_k_by_metric_then_average(tmp_path):
    ckpts = {_ckpt(tmp_path / f"c{i}", i): loss for i, loss in [(1, 0.5), (2, 0.3), (3, 0.9), (4, 0.2)]}
    best = select_top_k(ckpts, 2, higher_is_better=False)
    assert [p.name for p in best] == ["c4", "c2"]
    out = merge_checkpoints(best, tmp_path / "merged")
    w = load_file(out / "model.safetensors")
    assert torch.equal(w["a"], torch.full((2, 3), 3.0)) and torch.equal(w["b"], torch.full((4,), 6.0))
    assert (out / "tag.txt").read_text() == "4"  # non-weight files from the best
    assert not (tmp_path / "merged.partial").exists()


def test_mismatched_checkpoints_are_refused(tmp_path):
    a = _ckpt(tmp_path / "a", 1)
    b = _ckpt(tmp_path / "b", 2, extra={"c": torch.zeros(1)})
    c = _ckpt(tmp_path / "c", 3, shape=(3, 2))
    d = _ckpt(tmp_path / "d", 4, dtype=torch.bfloat16)
    e = _ckpt(tmp_path / "e", 5, config='{"hidden_size": 4}')
    with pytest.raises(MergeError, match="extra \\['c'\\]"):
        merge_checkpoints([a, b], tmp_path / "out1")
    with pytest.raises(MergeError, match="weight 'a' is torch.float32 of shape \\(3, 2\\)"):
        merge_checkpoints([a, c], tmp_path / "out2")
    with pytest.raises(MergeError, match="weight 'a' is torch.bfloat16 of shape \\(2, 3\\)"):
        merge_checkpoints([a, d], tmp_path / "out3")
    with pytest.raises(MergeError, match="e/config.json differs from .*a/config.json in \\['hidden_size'\\]"):
        merge_checkpoints([a, e], tmp_path / "out4")
    assert not any((tmp_path / f"out{i}").exists() for i in range(1, 5))
    assert not list(tmp_path.glob("*.partial"))


def test_inputs_are_never_overwritten(tmp_path):
    a, b = _ckpt(tmp_path / "a", 1), _ckpt(tmp_path / "b", 2)
    before = (a / "model.safetensors").read_bytes()
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoints([a, b], a)
    assert (a / "model.safetensors").read_bytes() == before


def test_bad_k_is_refused(tmp_path):
    with pytest.raises(MergeError, match="k must be between 1 and the number of checkpoints \\(1\\), got 2"):
        select_top_k({tmp_path: 1.0}, 2, True)
