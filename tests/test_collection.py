"""Tests for the Python API, lookalike.open(STORE): queries of every kind, absolute paths, add."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import photo_name, write_photo
from PIL import Image

import lookalike
from lookalike.errors import ImageError, InvalidArgumentError

SEED = 7  # the stored photo the queries are made from


@pytest.fixture(scope="module")
def photos(tiny_store):
    with lookalike.open(tiny_store) as collection:
        yield collection


def _query_kinds(path: Path) -> dict:
    with Image.open(path) as img:
        img.load()
        pil = img.copy()
    array = np.asarray(pil.convert("RGB"))
    return {
        "str": str(path),
        "Path": path,
        "bytes": path.read_bytes(),
        "PIL image": pil,
        "PIL image, unread": Image.open(path),
        "uint8 array": array,
        "float array": array.astype(np.float32) / 255.0,
        "RGBA array": np.dstack([array, np.full(array.shape[:2], 255, np.uint8)]),
    }


@pytest.mark.parametrize(
    "kind",
    ["str", "Path", "bytes", "PIL image", "PIL image, unread"]
    + ["uint8 array", "float array", "RGBA array"],
)
def test_search_finds_the_stored_photo_first(photos, photos_dir, kind):
    path = photos_dir / photo_name(SEED)
    hits = photos.search(_query_kinds(path)[kind], k=3)
    assert len(hits) == 3
    best = hits[0]
    assert best.path == path.resolve() and best.path.is_absolute() and best.path.exists()
    assert best.stored_path == photo_name(SEED)
    assert best.score >= 0.99, f"{kind}: {best.score:.4f}"
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_a_query_of_any_size_and_grey(photos, photos_dir):
    path = photos_dir / photo_name(SEED)
    with Image.open(path) as img:
        big = img.convert("RGB").resize((640, 480))
    assert photos.search(big, k=1)[0].stored_path == photo_name(SEED)
    grey = np.asarray(big.convert("L"))  # (H, W): accepted, made RGB like grey files are
    assert len(photos.search(grey, k=2)) == 2


def test_the_module_and_the_context_manager(tiny_store):
    assert lookalike.__version__
    with lookalike.open(tiny_store) as collection:
        assert len(collection) == 30
        assert collection.root == Path(tiny_store).resolve()
    with pytest.raises(lookalike.LookalikeError):
        lookalike.open(tiny_store / "missing")


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((4, 4, 2), np.uint8), ImageError),
        (np.zeros((4, 4, 3), np.int64), ImageError),
        (np.full((4, 4, 3), 3.0), ImageError),
        (b"not an image", ImageError),
        (12345, InvalidArgumentError),
    ],
)
def test_bad_queries_raise_one_clear_error(photos, bad, error):
    with pytest.raises(error) as info:
        photos.search(bad)
    assert str(info.value)


def test_similar_and_suggest(photos, photos_dir):
    stored = photos.search(photos_dir / photo_name(SEED), k=1)[0]
    hit = photos.similar(stored.id, k=2)
    assert len(hit) == 2 and all(h.id != stored.id for h in hit)
    suggestion = photos.suggest(hit[0].path, k=5)
    assert len(suggestion.neighbours) == 5 and suggestion.neighbours[0].id == hit[0].id


def test_duplicates_have_absolute_paths(photos):
    groups = photos.duplicates(threshold=0.5)
    assert groups, "a threshold of 0.5 joins some of the synthetic photos"
    for group in groups:
        assert group.keep.is_absolute() and group.keep.exists()
        assert all(p.is_absolute() and -1 <= s <= 1 for p, s in group.others)


def test_add_then_search(store_copy, tmp_path):
    _, store = store_copy
    new = write_photo(tmp_path / "new.png", 9001)
    with lookalike.open(store) as collection:
        added = collection.add(new, np.asarray(Image.open(new)))
        assert len(added) == 2 and len(collection) == 32
        assert all(p.path.is_absolute() and p.path.exists() for p in added)
        best = collection.search(new, k=1)[0]
        assert best.id in {p.id for p in added} and best.score >= 0.99


def test_import_loads_neither_tensorflow_nor_faiss():
    code = (
        "import sys, lookalike; lookalike.__version__; lookalike.Match; "
        "print(sorted(m for m in ('tensorflow', 'faiss', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_readme_example_runs(store_copy, photos_dir, tmp_path, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    _, store = store_copy
    new = write_photo(tmp_path / "new.jpg", 9002)
    values = {"STORE": store, "PHOTO": photos_dir / photo_name(SEED), "NEW": new}
    lines = code.splitlines()
    for name, value in values.items():
        (i,) = [n for n, line in enumerate(lines) if line.startswith(f"{name} = ")]
        lines[i] = f"{name} = {str(value)!r}"
    exec(compile("\n".join(lines), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "1.000" in printed and str(photos_dir / photo_name(SEED)) in printed
