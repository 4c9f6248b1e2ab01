import pickle

import pytest
import torch

from scar.checkpoint import load_checkpoint, save_checkpoint
from scar.errors import CheckpointError, MissingDataError
from scar.models.base import ModelSpec


def test_round_trip_gives_identical_outputs(tmp_path, tiny_model, tiny_spec, synth):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, tiny_spec,
                           synth.info.input_spec, {"role": "original", "dataset": "synthetic"})
    assert path.with_suffix(".json").exists()
    ck = load_checkpoint(path)
    x = torch.randn(3, 1, 16, 16)
    tiny_model.eval()
    assert torch.equal(ck.model(x), tiny_model(x))
    assert ck.model_spec == tiny_spec and ck.meta["role"] == "original"
    assert ck.meta["versions"]["torch"] == torch.__version__


def test_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"weights": Evil()}, fh)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path, model_spec=ModelSpec("mlp", 4, 1, 16))


def test_plain_state_dict_loads_with_explicit_spec(tmp_path, tiny_model, tiny_spec, synth):
    path = tmp_path / "sd.pt"
    torch.save(tiny_model.state_dict(), path)
    ck = load_checkpoint(path, model_spec=tiny_spec, input_spec=synth.info.input_spec)
    assert torch.equal(ck.model.fc.weight, tiny_model.fc.weight)


def test_mismatched_architecture_or_classes(tmp_path, tiny_model, tiny_spec, synth):
    path = save_checkpoint(tmp_path / "m", tiny_model, tiny_spec, synth.info.input_spec)
    other = ModelSpec("fastcnn", 7, 1, 16, kwargs=tiny_spec.kwargs)
    with pytest.raises(CheckpointError, match="does not match architecture 'fastcnn' with 7"):
        load_checkpoint(path, model_spec=other, input_spec=synth.info.input_spec)
    with pytest.raises(CheckpointError, match="4-class model but 10 classes were expected"):
        load_checkpoint(path, expect_num_classes=10)


def test_missing_file_and_missing_sidecar(tmp_path, tiny_model, tiny_spec, synth):
    from safetensors.torch import save_file

    with pytest.raises(MissingDataError):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = save_checkpoint(tmp_path / "m", tiny_model, tiny_spec, synth.info.input_spec,
                           {"role": "original"})
    path.with_suffix(".json").unlink()
    assert load_checkpoint(path).meta["role"] == "original"  # the weights carry their metadata
    bare = tmp_path / "bare.safetensors"  # written by other tools: no metadata, no sidecar
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(bare))
    with pytest.raises(CheckpointError, match="no sidecar"):
        load_checkpoint(bare)


def test_weights_and_metadata_cannot_disagree(tmp_path, tiny_model, tiny_spec, synth, caplog):
    """Issue 12: two writers to one path (or an interrupt between the weights and the sidecar)
    once left one run's weights under another's sidecar, and `evaluate` trusted the sidecar."""
    import logging
    import shutil

    a = save_checkpoint(tmp_path / "a", tiny_model, tiny_spec, synth.info.input_spec,
                        {"method": "finetune", "role": "unlearned"})
    b = save_checkpoint(tmp_path / "b", tiny_model, tiny_spec, synth.info.input_spec,
                        {"method": "scar", "role": "unlearned"})
    shutil.copy(b.with_suffix(".json"), a.with_suffix(".json"))  # the other writer's sidecar
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(a)
    assert ck.meta["method"] == "finetune"
    assert "does not match the metadata inside" in caplog.text


def test_corrupt_safetensors(tmp_path, tiny_model, tiny_spec, synth):
    path = save_checkpoint(tmp_path / "m", tiny_model, tiny_spec, synth.info.input_spec)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path)


def test_empty_and_refused_files_give_one_clear_reason(tmp_path):
    """A zero-byte .pt once raised IndexError; the pickle refusal quoted torch's advice to
    turn the safety check off."""
    empty = tmp_path / "zero.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty, model_spec=ModelSpec("mlp", 4, 1, 16))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil, model_spec=ModelSpec("mlp", 4, 1, 16))
    assert "weights_only=False" not in str(info.value) and "never unpickles" in str(info.value)


@pytest.mark.parametrize("edit", [
    lambda m: m["model"].update(num_classes="ten"),
    lambda m: m.update(model="fastcnn"),
    lambda m: m.update(input_spec=None),
    lambda m: m["model"].pop("name"),
    lambda m: m["model"].update(kwargs={"bogus": 1}),
    lambda m: m.update(model=["a"]),
    lambda m: m.update(input_spec={"channels": "x"}),
    lambda m: m["model"].update(num_classes=-3),
], ids=["str-classes", "model-str", "input-null", "no-name", "bad-kwarg", "model-list",
        "bad-channels", "negative-classes"])
def test_malformed_sidecar_is_a_clear_error(edit, tmp_path, tiny_model, tiny_spec, synth):
    """A checkpoint whose metadata lives only in its sidecar (written by an older version or
    by hand), with the sidecar edited: a ScarError naming the problem, never a traceback."""
    import json

    from safetensors.torch import save_file

    from scar.errors import ScarError

    path = save_checkpoint(tmp_path / "m", tiny_model, tiny_spec, synth.info.input_spec)
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    edit(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ScarError):
        load_checkpoint(path)


def test_a_folder_as_checkpoint_names_the_files_inside(tmp_path, tiny_model, tiny_spec, synth):
    save_checkpoint(tmp_path / "m", tiny_model, tiny_spec, synth.info.input_spec)
    with pytest.raises(CheckpointError, match=r"is a folder.*m\.safetensors"):
        load_checkpoint(tmp_path)


def test_written_files_respect_the_umask(tmp_path, tiny_model, tiny_spec, synth):
    """Issue 12: every output file was mode 0600 (mkstemp's), whatever the umask."""
    import os

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m", tiny_model, tiny_spec, synth.info.input_spec)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.with_suffix(".json").stat().st_mode & 0o777 == 0o644


def test_architecture_mismatch_is_summarised_not_dumped(tmp_path, synth):
    """Issue 12: torch's full key dump (3 KB for a ResNet-18) was quoted in the message."""
    from scar.models.base import build_model

    path = tmp_path / "r.pt"
    torch.save(build_model(ModelSpec("resnet18", 4, 1, 16)).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model_spec=ModelSpec("fastcnn", 4, 1, 16),
                        input_spec=synth.info.input_spec)
    msg = str(info.value)
    assert len(msg) < 600 and "missing (" in msg and "unexpected (" in msg and "more" in msg
