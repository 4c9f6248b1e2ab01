"""Surrogate sources: shapes, determinism, channel conversion, and the subset builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scar.data.surrogates import SURROGATES, build_surrogate_subset, load_surrogate
from scar.errors import ConfigError, MissingDataError, UnknownComponentError


def write_image(path: Path, seed: int, mode: str = "RGB", size=(20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/{a: 5 PNG, b: 2 JPEG, c/images: 4 PNG (grey)} + one loose file at the root."""
    root = tmp_path / "tree"
    for i in range(5):
        write_image(root / "a" / f"{i}.png", i)
    for i in range(2):
        write_image(root / "b" / f"{i}.jpg", 10 + i)
    for i in range(4):
        write_image(root / "c" / "images" / f"{i}.png", 20 + i, mode="L")
    write_image(root / "loose.png", 99)
    return root


def sources(tree: Path) -> list[str]:
    return [
        "gaussian-noise",
        "natural-patches",
        "digits",
        f"imagefolder:{tree}",
        "dataset:synthetic",
    ]


def test_registry_names():
    for name in ("gaussian-noise", "natural-patches", "digits", "imagefolder:/x", "dataset:mnist"):
        assert name in SURROGATES


@pytest.mark.parametrize("channels", [1, 3])
def test_every_source_shape_dtype_count(tree, channels):
    for name in sources(tree):
        out = load_surrogate(name, channels=channels, size=12, n=6, seed=0)
        assert out.images.shape == (6, channels, 12, 12), name
        assert out.images.dtype == torch.uint8, name
        assert out.labels.shape == (6,) and out.labels.dtype == torch.long, name


def test_every_source_is_seeded(tree):
    for name in sources(tree):
        a = load_surrogate(name, channels=3, size=8, n=5, seed=1)
        b = load_surrogate(name, channels=3, size=8, n=5, seed=1)
        c = load_surrogate(name, channels=3, size=8, n=5, seed=2)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), name
        assert not torch.equal(a.images, c.images), name


def test_default_counts():
    assert len(load_surrogate("gaussian-noise", channels=1, size=4)) == 5000
    assert len(load_surrogate("digits", channels=1, size=8)) == 1797


def test_grey_to_rgb_repeats_channels():
    out = load_surrogate("digits", channels=3, size=16, n=10)
    assert torch.equal(out.images[:, 0], out.images[:, 1])
    assert torch.equal(out.images[:, 0], out.images[:, 2])
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) <= 9


def test_rgb_to_grey_and_labels(tree):
    out = load_surrogate(f"imagefolder:{tree}", channels=1, size=10)
    assert out.images.shape == (12, 1, 10, 10)
    # labels: top-level folder index (a=0, b=1, c=2), -1 for the loose file
    assert sorted(out.labels.tolist()) == [-1] + [0] * 5 + [1] * 2 + [2] * 4


def test_generated_sources_are_unlabelled_and_varied():
    for name in ("gaussian-noise", "natural-patches"):
        out = load_surrogate(name, channels=3, size=16, n=20, seed=0)
        assert (out.labels == -1).all(), name
        assert out.images.float().std() > 10, name


def test_errors(tree, tmp_path):
    with pytest.raises(UnknownComponentError, match="natural-patches"):
        load_surrogate("natural-patch", channels=3, size=8)
    with pytest.raises(ConfigError, match="holds 1797 images"):
        load_surrogate("digits", channels=1, size=8, n=2000)
    with pytest.raises(ConfigError, match="out-of-distribution"):
        load_surrogate("dataset:synthetic", channels=1, size=8, exclude_dataset="synthetic")
    with pytest.raises(MissingDataError, match="does not exist"):
        load_surrogate(f"imagefolder:{tmp_path / 'nope'}", channels=3, size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        load_surrogate(f"imagefolder:{tmp_path / 'empty'}", channels=3, size=8)
    with pytest.raises(ConfigError, match="channels"):
        load_surrogate("gaussian-noise", channels=2, size=8)


# --------------------------------------------------------------------------------------------
# build_surrogate_subset
# --------------------------------------------------------------------------------------------


def listing(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir())}


def test_build_subset(tree, tmp_path, caplog):
    out = tmp_path / "out"
    summary = build_surrogate_subset(tree, out, per_class=3, seed=0)
    assert summary["classes"] == 3 and summary["images"] == 8
    assert summary["short_classes"] == {"b": 2}
    assert "fewer than 3 images" in caplog.text
    files = listing(out)
    assert [len(v) for v in files.values()] == [3, 2, 3]
    assert all(name.startswith("images_") for name in files["c"])
    copied = next((out / "a").iterdir())
    assert not copied.is_symlink()
    assert copied.read_bytes() == (tree / "a" / copied.name).read_bytes()
    again = tmp_path / "again"
    build_surrogate_subset(tree, again, per_class=3, seed=0)
    assert listing(again) == files
    chosen = set()
    for seed in range(1, 5):
        build_surrogate_subset(tree, tmp_path / f"seed{seed}", per_class=3, seed=seed)
        chosen.add(tuple(listing(tmp_path / f"seed{seed}")["a"]))
    assert len(chosen) > 1  # the seed changes the choice


def test_build_subset_errors(tree, tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        build_surrogate_subset(tmp_path / "nope", tmp_path / "o1", 2, 0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ConfigError, match="No class folders"):
        build_surrogate_subset(tmp_path / "flat", tmp_path / "o2", 2, 0)
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        build_surrogate_subset(tree, tmp_path / "o3", 2, 0)
    with pytest.raises(ConfigError, match="per_class"):
        build_surrogate_subset(tree, tmp_path / "o4", 0, 0)


def test_absurd_surrogate_sizes_are_refused_before_allocating():
    """`--surrogate-n 1000000000` was killed by the OOM killer after minutes."""
    with pytest.raises(ConfigError, match="surrogate n"):
        load_surrogate("gaussian-noise", channels=1, size=16, n=1_000_000_000)
    with pytest.raises(ConfigError, match="GiB"):  # 900k images of 3x1024x1024: 2.6 TiB
        load_surrogate("gaussian-noise", channels=3, size=1024, n=900_000)


def test_bad_image_files_are_skipped_and_counted(tree, tmp_path, caplog):
    """Issue 12: one undecodable file aborted a whole surrogate folder, `surrogate build`
    copied undecodable files, and a decompression bomb was a traceback."""
    from PIL import Image

    (tree / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level("WARNING"):
        images = load_surrogate(f"imagefolder:{tree}", channels=3, size=8)
    assert len(images) == 12 and "skipped 1 of 13" in caplog.text and "broken.png" in caplog.text
    summary = build_surrogate_subset(tree, tmp_path / "sub", per_class=5, seed=0)
    assert summary["skipped_undecodable"] == ["b/broken.png"] and summary["images"] == 11
    assert not (tmp_path / "sub" / "b" / "broken.png").exists()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="none of its 1 image files can be decoded"):
        load_surrogate(f"imagefolder:{only_bad}", channels=3, size=8)
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    Image.new("L", (200, 200)).save(bomb / "big.png")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # 40,000 pixels > 2x the limit: PIL's bomb error
    try:
        with pytest.raises(ConfigError, match="big.png.*exceeds limit"):
            load_surrogate(f"imagefolder:{bomb}", channels=1, size=8)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
