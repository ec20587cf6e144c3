"""Each kind of bad input stops the data set from opening, with a message naming the file, the id and the problem."""

import json
import shutil

import pytest

from samtune.data.coco import CocoFormatError, CocoInstanceDataset


def _open(path, image_dir, data=None):
    if data is not None:
        path.write_text(json.dumps(data))
    return CocoInstanceDataset(path, image_dir)


def _first_annotated(data):
    image_id = next(a["image_id"] for a in data["annotations"] if not a["iscrowd"])
    image = next(i for i in data["images"] if i["id"] == image_id)
    return image, next(a for a in data["annotations"] if a["image_id"] == image_id)


def test_malformed_json_names_line_and_column(coco_copy):
    path, image_dir, _ = coco_copy
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(CocoFormatError, match=r"annotations\.json: malformed JSON at line 2, column 12"):
        _open(path, image_dir)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(CocoFormatError, match=r"nope\.json: cannot read annotation file"):
        CocoInstanceDataset(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ("images", "file_name", r"image id \d+ is missing required key 'file_name'"),
        ("images", "width", r"image id \d+ is missing required key 'width'"),
        ("annotations", "category_id", r"annotation id \d+ is missing required key 'category_id'"),
        ("annotations", "segmentation", r"annotation id \d+ is missing required key 'segmentation'"),
        ("categories", "name", r"category id \d+ is missing required key 'name'"),
    ],
)
def test_missing_required_keys(coco_copy, section, key, message):
    path, image_dir, data = coco_copy
    del data[section][0][key]
    with pytest.raises(CocoFormatError, match=r"annotations\.json: " + message):
        _open(path, image_dir, data)


def test_missing_top_level_list(coco_copy):
    path, image_dir, data = coco_copy
    del data["annotations"]
    with pytest.raises(CocoFormatError, match="missing required list 'annotations'"):
        _open(path, image_dir, data)


def test_wrong_type(coco_copy):
    path, image_dir, data = coco_copy
    data["images"][0]["width"] = "wide"
    with pytest.raises(CocoFormatError, match=r"image id \d+ has 'width' = 'wide'"):
        _open(path, image_dir, data)


def test_image_file_missing(coco_copy, tmp_path):
    path, image_dir, data = coco_copy
    local = tmp_path / "images"
    shutil.copytree(image_dir, local)
    image = data["images"][2]
    (local / image["file_name"]).unlink()
    with pytest.raises(
        CocoFormatError, match=rf"image id {image['id']} \(.*{image['file_name']}\): image file is missing"
    ):
        _open(path, local, data)


def test_image_file_unreadable(coco_copy, tmp_path):
    path, image_dir, data = coco_copy
    local = tmp_path / "images"
    shutil.copytree(image_dir, local)
    image = data["images"][1]
    (local / image["file_name"]).write_bytes(b"this is not an image")
    with pytest.raises(CocoFormatError, match=rf"image id {image['id']} .*cannot read image header"):
        _open(path, local, data)


def test_truncated_image_fails_when_loaded_with_its_name(coco_copy, tmp_path):
    path, image_dir, data = coco_copy
    local = tmp_path / "images"
    shutil.copytree(image_dir, local)
    index, image = next((n, i) for n, i in enumerate(data["images"]) if i["file_name"].endswith(".jpg"))
    file = local / image["file_name"]
    file.write_bytes(file.read_bytes()[:-400])  # header intact, end of the pixel data cut
    dataset = _open(path, local, data)
    with pytest.raises(CocoFormatError, match=rf"image id {image['id']} .*cannot decode image"):
        dataset[index]


@pytest.mark.parametrize("file_name", ["../outside.png", "rgb/../../outside.png", "/etc/passwd", "C:\\images\\a.png"])
def test_file_name_escaping_the_image_folder(coco_copy, file_name):
    path, image_dir, data = coco_copy
    data["images"][0]["file_name"] = file_name
    with pytest.raises(
        CocoFormatError, match=rf"image id {data['images'][0]['id']}: file_name .* escapes the image folder"
    ):
        _open(path, image_dir, data)


def test_annotation_for_unknown_image(coco_copy):
    path, image_dir, data = coco_copy
    data["annotations"][0]["image_id"] = 424242
    ann_id = data["annotations"][0]["id"]
    with pytest.raises(
        CocoFormatError, match=rf"annotation id {ann_id} refers to image id 424242, which does not exist"
    ):
        _open(path, image_dir, data)


def test_annotation_for_unknown_category(coco_copy):
    path, image_dir, data = coco_copy
    data["annotations"][0]["category_id"] = 1  # ids are non-contiguous: 1 is not one of them
    ann_id = data["annotations"][0]["id"]
    with pytest.raises(CocoFormatError, match=rf"annotation id {ann_id} .*category id 1, which does not exist"):
        _open(path, image_dir, data)


def test_size_matches_neither_json_nor_its_transpose(coco_copy):
    path, image_dir, data = coco_copy
    image = data["images"][0]
    image["width"] += 3
    with pytest.raises(
        CocoFormatError, match=rf"image id {image['id']} .*JSON says width x height = {image['width']}x"
    ):
        _open(path, image_dir, data)


def test_transposed_size_without_exif_is_an_error(coco_copy):
    path, image_dir, data = coco_copy
    image = next(i for i in data["images"] if i["file_name"].endswith(".png") and i["width"] != i["height"])
    image["width"], image["height"] = image["height"], image["width"]
    with pytest.raises(CocoFormatError, match=rf"image id {image['id']} .*EXIF orientation 1"):
        _open(path, image_dir, data)


def test_rle_of_the_wrong_size(coco_copy):
    path, image_dir, data = coco_copy
    ann = next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))
    ann["segmentation"]["size"] = [5, 5]
    with pytest.raises(CocoFormatError, match=rf"annotation id {ann['id']} .*RLE size \[5, 5\] does not match"):
        _open(path, image_dir, data)


def test_bad_polygon(coco_copy):
    path, image_dir, data = coco_copy
    data["annotations"][0]["segmentation"] = [[1, 2, "x", 4, 5, 6]]
    with pytest.raises(CocoFormatError, match=rf"annotation id {data['annotations'][0]['id']} .*flat list of numbers"):
        _open(path, image_dir, data)


@pytest.mark.parametrize("section", ["images", "annotations", "categories"])
def test_duplicate_ids(coco_copy, section):
    path, image_dir, data = coco_copy
    data[section].append(dict(data[section][0]))
    with pytest.raises(CocoFormatError, match=r"id \d+ appears twice"):
        _open(path, image_dir, data)
