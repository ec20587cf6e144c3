import json

from PIL import Image

from samtune.data.images import EXIF_ORIENTATION
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco


def test_covers_what_real_data_throws_at_a_loader(coco):
    annotation_file, image_dir = coco
    data = json.loads(annotation_file.read_text())
    category_ids = sorted(c["id"] for c in data["categories"])
    assert category_ids != list(range(1, len(category_ids) + 1))  # non-contiguous
    segs = [a["segmentation"] for a in data["annotations"]]
    assert any(isinstance(s, list) for s in segs)  # polygons
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)  # compressed RLE
    assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs)  # uncompressed RLE
    assert any(a["iscrowd"] for a in data["annotations"])
    annotated = {a["image_id"] for a in data["annotations"]}
    assert any(image["id"] not in annotated for image in data["images"])
    assert all("/" in image["file_name"] for image in data["images"])  # sub-folders
    ratios = [image["width"] / image["height"] for image in data["images"]]
    assert min(ratios) < 0.8 and max(ratios) > 1.25
    modes, orientations = set(), set()
    for image in data["images"]:
        with Image.open(image_dir / image["file_name"]) as file:
            modes.add(file.mode)
            orientations.add(file.getexif().get(EXIF_ORIENTATION, 1))
    assert {"RGB", "L", "RGBA", "P", "I;16"} <= modes
    assert 6 in orientations


def test_deterministic_for_a_seed(tmp_path):
    spec = SyntheticSpec(num_images=5, seed=11)
    a, _ = make_synthetic_coco(tmp_path / "a", spec)
    b, _ = make_synthetic_coco(tmp_path / "b", spec)
    c, _ = make_synthetic_coco(tmp_path / "c", SyntheticSpec(num_images=5, seed=12))
    assert a.read_text() == b.read_text()
    assert a.read_text() != c.read_text()
    assert (tmp_path / "a/images/rgb/000100.png").read_bytes() == (tmp_path / "b/images/rgb/000100.png").read_bytes()
