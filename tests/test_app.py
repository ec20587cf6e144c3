"""samtune app: the page's logic without a browser (encoder once per image, refinement by the last mask, IoU
against the ground truth, the downloads), its command line, and the page itself in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy.ndimage import distance_transform_edt

import samtune.image_encoding as image_encoding
from samtune import cli
from samtune.app import main as app_main
from samtune.app import session as session_module
from samtune.app.main import build_parser, build_session
from samtune.app.server import make_server
from samtune.app.session import Session
from samtune.demo.assets import BASE_DIR
from samtune.demo.domains import DomainSpec, make_domain_coco
from samtune.errors import UserError
from samtune.models.loading import load_trained
from samtune.predict import Instance, prompted_masks
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.testing.tiny import save_tiny

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # the browser test's screenshot (ignored by git)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[Path, Path]:
    """Four images of the demo's target domain, with their COCO file (the demo's own generator, small)."""
    return make_domain_coco(tmp_path_factory.mktemp("demo-target"), DomainSpec("target", 4, seed=7003))


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on the shipped demo base whose decoder weights moved a little: the fine-tuned side."""
    from peft import LoraConfig, get_peft_model

    model, processor = load_trained(BASE_DIR)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*mask_decoder.*\.(q_proj|k_proj|v_proj|out_proj)")
    torch.manual_seed(0)  # lora_A's initialisation: the same adapter whichever tests ran before
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data = 0.05 * torch.randn(parameter.shape, generator=generator)
    folder = tmp_path_factory.mktemp("demo-adapter")
    peft_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _args(**values) -> Namespace:
    args = build_parser().parse_args([])
    for key, value in values.items():
        setattr(args, key, value)
    return args


def _inside(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``mask`` farthest from its boundary: where a person clicks."""
    y, x = np.unravel_index(np.argmax(distance_transform_edt(mask)), mask.shape)
    return int(x), int(y)


@pytest.fixture
def encoder_calls(monkeypatch) -> list[int]:
    """One entry per image-encoder run (samtune.image_encoding's image_features, what encode_image calls)."""
    calls: list[int] = []
    real = image_encoding.image_features

    def counted(model, pixel_values, *args, **kwargs):
        calls.append(int(pixel_values.shape[0]))
        return real(model, pixel_values, *args, **kwargs)

    monkeypatch.setattr(image_encoding, "image_features", counted)
    return calls


@pytest.fixture
def demo_session(demo_data, demo_adapter) -> Session:
    annotations, images = demo_data
    return build_session(
        _args(model=str(BASE_DIR), adapter=str(demo_adapter), compare_base=True, annotations=annotations, images=images)
    )


def test_the_encoder_runs_once_per_image_shown(demo_session, encoder_calls):
    session = demo_session
    masks = session.truth.masks
    x, y = _inside(masks[0])
    session.click(x, y)
    session.click(x + 1, y, positive=True)
    session.box(0, 0, 40, 40)
    session.new_object()
    session.click(*_inside(masks[-1]))
    assert encoder_calls == [1, 1]  # one image, two panels (base and fine-tuned), four prompts
    assert [panel.encodes for panel in session.panels] == [1, 1]
    session.open(1)
    session.click(*_inside(session.truth.masks[0]))
    session.click(*_inside(session.truth.masks[0]), positive=False)
    assert encoder_calls == [1, 1, 1, 1]
    session.open(1)  # opened again: a new image on the page, encoded again
    session.click(5, 5)
    assert len(encoder_calls) == 6


def test_the_base_panel_is_the_model_without_its_adapter(demo_session, demo_adapter):
    session = demo_session
    assert [panel.name for panel in session.panels] == ["base", "fine-tuned"]
    x, y = _inside(session.truth.masks[0])
    session.click(x, y)
    base, tuned = session.current.last.found
    image = session.image
    plain, processor = load_trained(BASE_DIR)
    (expected,) = prompted_masks(plain, processor, image, [Instance(0, None, [[x, y]], [1])], "cpu")
    torch.testing.assert_close(base.logits, expected.logits)
    adapted, processor = load_trained(BASE_DIR, demo_adapter)
    (expected,) = prompted_masks(adapted, processor, image, [Instance(0, None, [[x, y]], [1])], "cpu")
    torch.testing.assert_close(tuned.logits, expected.logits)
    assert not torch.equal(base.logits, tuned.logits)


def test_a_further_click_refines_with_the_last_mask(demo_session, monkeypatch):
    session = demo_session
    seen: list[Instance] = []
    real = session_module.decode_prompts

    def spy(model, processor, encoded, instances, *args):
        seen.extend(instances)
        return real(model, processor, encoded, instances, *args)

    monkeypatch.setattr(session_module, "decode_prompts", spy)
    truth = session.truth.masks[0]
    x, y = _inside(truth)
    session.click(x, y)
    first = session.current.last.found
    outside = np.argwhere(~truth)[0]
    session.click(float(outside[1]), float(outside[0]), positive=False)
    second = session.current.last.found
    assert seen[0].previous is None and seen[0].multimask  # a lone click: SAM's best of three
    for panel in range(2):
        instance = seen[2 + panel]
        assert instance.points == [[x, y], [float(outside[1]), float(outside[0])]] and instance.labels == [1, 0]
        assert instance.previous is first[panel].logits  # this panel's own last mask
    # the same as predict's correction round: both clicks and round 1's logits as the mask prompt
    model, processor = session.panels[1].model, session.panels[1].processor
    round2 = Instance(0, None, seen[2].points, [1, 0], first[1].logits)
    (expected,) = prompted_masks(model, processor, session.image, [round2], "cpu")
    torch.testing.assert_close(second[1].logits, expected.logits)
    assert not torch.equal(second[1].logits, first[1].logits)
    session.undo()
    assert session.current.last.found is first


def test_iou_against_the_ground_truth(demo_session):
    session = demo_session
    truth = session.truth
    k = len(truth.masks) - 1
    x, y = _inside(truth.masks[k])
    session.click(x, y)
    state = session.state()
    for panel, row in enumerate(state["panels"]):
        mask = session.current.last.found[panel].mask.numpy() & ~truth.ignore
        target = truth.masks[k] & ~truth.ignore
        expected = (mask & target).sum() / (mask | target).sum()
        assert row["truth_id"] == truth.annotation_ids[k]  # the instance under the click
        assert row["truth_iou"] == pytest.approx(expected, abs=1e-4)
        assert row["score"] == pytest.approx(session.current.last.found[panel].score, abs=1e-4)
        assert row["area"] == int(session.current.last.found[panel].mask.sum())
    # the ground truth itself as the mask scores 1
    step = session.current.last
    found = step.found[1]
    step.found[1] = found._replace(mask=torch.from_numpy(truth.masks[k]))
    assert session.truth_match(step, 1) == (truth.annotation_ids[k], pytest.approx(1.0))
    assert state["has_truth"] and state["truth_count"] == len(truth.masks)


def _get(url: str) -> tuple[bytes, dict]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read(), dict(reply.headers)


def _post(url: str, value: dict | bytes) -> dict:
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=30) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return {"status": error.code, **json.loads(error.read())}


@pytest.fixture
def served(demo_session):
    server = make_server(demo_session, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield demo_session, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_downloads_hold_the_masks(served, demo_data):
    session, url = served
    annotations, _ = demo_data
    truth = session.truth.masks
    _post(f"{url}/api/click", {"x": _inside(truth[0])[0], "y": _inside(truth[0])[1]})
    _post(f"{url}/api/new_object", {})
    state = _post(f"{url}/api/box", {"box": [0, 0, 60, 50]})
    assert state["objects"] == 2
    body, headers = _get(f"{url}/api/results/1.json")
    assert (
        "attachment" in headers["Content-Disposition"] and "fine-tuned.results.json" in headers["Content-Disposition"]
    )
    results = json.loads(body)
    assert [r["instance_id"] for r in results] == [0, 1]
    image_id = session.dataset.images[0].image_id
    for result, obj in zip(results, session.finished()):
        found = obj.last.found[1]
        assert result["image_id"] == image_id and result["file_name"] == session.sources[0].name
        assert result["score"] == pytest.approx(found.score)
        assert np.array_equal(mask_utils.decode(result["segmentation"]).astype(bool), found.mask.numpy())
    coco = COCO(str(annotations))
    loaded = coco.loadRes(results)  # a valid COCO results file for the image's own data set
    assert len(loaded.getAnnIds(imgIds=[image_id])) == 2
    body, _ = _get(f"{url}/api/mask/0.png")
    labels = np.asarray(Image.open(io.BytesIO(body)))
    expected = np.zeros(labels.shape, np.uint8)
    for k, obj in enumerate(session.finished(), start=1):
        expected[obj.last.found[0].mask.numpy()] = k
    assert np.array_equal(labels, expected)
    view, _ = _get(f"{url}/api/view/0.png")
    assert Image.open(io.BytesIO(view)).size == (session.image.shape[1], session.image.shape[0])
    bad = _post(f"{url}/api/click", {"x": 10_000, "y": 3})
    assert bad["status"] == 400 and "outside the 256x256 image" in bad["error"]
    assert _post(f"{url}/api/upload?name=x.png", b"not an image")["status"] == 400
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(buffer, format="PNG")
    state = _post(f"{url}/api/upload?name=grey.png", buffer.getvalue())
    assert state["images"][-1] == "grey.png" and (state["width"], state["height"]) == (50, 40)
    assert not state["has_truth"]


@pytest.mark.parametrize("family", ["sam", "sam_hq", "sam2", "sam3_tracker"])
def test_every_family(family, tmp_path, encoder_calls):
    folder = save_tiny(tmp_path / "model", family, seed=2)
    annotations, images = make_synthetic_coco(tmp_path / "data", SyntheticSpec(num_images=2, seed=5, max_side=96))
    session = build_session(_args(model=str(folder), images=images))
    assert [p.name for p in session.panels] == ["model"] and not session.state()["has_truth"]
    height, width = session.image.shape[:2]
    session.click(width / 2, height / 2)
    session.click(width / 3, height / 3, positive=False)
    found = session.current.last.found[0]
    assert found.mask.shape == (height, width) and np.isfinite(found.score)  # random weights: any score
    assert encoder_calls == [1]
    assert session.view(0).shape == (height, width, 3)


def test_demo_defaults(tmp_path, monkeypatch, demo_data, demo_adapter):
    annotations, images = demo_data
    monkeypatch.chdir(tmp_path)  # no runs/demo here: the base alone, and how to make a fine-tuned run
    session = build_session(_args(annotations=annotations, images=images))
    assert [p.name for p in session.panels] == ["model"]
    assert any("samtune train" in note for note in session.notes)
    shutil.copytree(demo_adapter, tmp_path / "runs" / "demo" / "best")
    session = build_session(_args(annotations=annotations, images=images))
    assert [(p.name, p.adapter_off) for p in session.panels] == [("base", True), ("fine-tuned", False)]
    assert len(session.sources) == 4 and session.truth is not None


def test_a_large_encoder_on_the_cpu_is_announced(demo_data, monkeypatch):
    annotations, images = demo_data
    session = build_session(_args(model=str(BASE_DIR), annotations=annotations, images=images))
    assert session.notes == []  # the demo base: 0.5M parameters, fast
    monkeypatch.setattr(session_module, "SLOW_ON_CPU", 1000)
    session = build_session(_args(model=str(BASE_DIR), annotations=annotations, images=images))
    assert len(session.notes) == 1 and "each new image takes seconds" in session.notes[0]
    assert session.state()["notes"] == session.notes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--compare-base", "--model", "x/y/z"], "--compare-base needs --adapter"),
        (["--annotations", "a.json"], "--annotations needs --images"),
        (["--adapter", "somewhere"], "need --model"),
        (["--model", str(BASE_DIR), "--images", "/nonexistent/images"], "no such file or folder"),
        (["--model", str(BASE_DIR), "--port", "70000"], "a port is 0-65535"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert cli.main(["app", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_busy_port_is_one_line(demo_session):
    server = make_server(demo_session, "127.0.0.1", 0)
    try:
        with pytest.raises(UserError, match="choose another: --port"):
            make_server(demo_session, "127.0.0.1", server.server_port)
    finally:
        server.server_close()


def test_the_app_stays_out_of_the_training_import_path():
    code = (
        "import sys, samtune.train, samtune.evaluate, samtune.predict, samtune.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('samtune.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert app_main.__name__ == "samtune.app.main"


# --- the page in a real browser ----------------------------------------------------------------------------------


def _chromium() -> str:
    """Debian's chromium (or $SAMTUNE_CHROMIUM) and Playwright, or a skip that CI turns into a failure."""
    path = os.environ.get("SAMTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    missing = []
    if not path:
        missing.append("chromium (apt-get install chromium, or set SAMTUNE_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install samtune[app])")
    if missing:
        why = f"the browser test needs {' and '.join(missing)}: bash launch/setup_app.sh installs both"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def test_the_page_in_chromium(demo_session):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    session = demo_session
    server = make_server(session, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    truth = session.truth.masks
    width, height = session.image.shape[1], session.image.shape[0]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            page.wait_for_function("Number(document.body.dataset.version) >= 1", timeout=30_000)
            assert page.locator("h2").all_inner_texts() == ["base", "fine-tuned"]

            def click(x: float, y: float, shift: bool = False) -> None:
                page.locator("#view-1").scroll_into_view_if_needed()
                frame = page.locator("#view-1").bounding_box()
                version = int(page.evaluate("document.body.dataset.version"))
                at = (
                    frame["x"] + (x + 0.5) * frame["width"] / width,
                    frame["y"] + (y + 0.5) * frame["height"] / height,
                )
                if shift:
                    page.keyboard.down("Shift")
                page.mouse.click(*at)
                if shift:
                    page.keyboard.up("Shift")
                page.wait_for_function(f"Number(document.body.dataset.version) > {version}", timeout=30_000)

            def read(panel: int) -> tuple[float, int, str]:
                texts = [page.locator(f"#{what}-{panel}").inner_text() for what in ("score", "area", "truth")]
                return float(texts[0]), int(texts[1]), texts[2]

            x, y = _inside(truth[0])
            click(x, y)
            first = [read(0), read(1)]
            for score, area, against in first:  # both panels: a mask, its predicted IoU, its IoU vs ground truth
                assert area > 0 and np.isfinite(score) and against.split()[0].replace(".", "").isdigit()
            for panel in range(2):  # the compare view shows two masks: the pictures are painted where they are
                view = _get(f"http://127.0.0.1:{server.server_port}/api/view/{panel}.png?v=1")[0]
                shown = np.asarray(Image.open(io.BytesIO(view)))
                mask = session.current.last.found[panel].mask.numpy()
                assert mask.sum() == first[panel][1]
                assert (shown[mask] != session.image[mask]).any(axis=-1).mean() > 0.9
            ARTIFACTS.mkdir(exist_ok=True)  # the page after the first click: two masks side by side
            page.screenshot(path=str(ARTIFACTS / "app-page.png"), full_page=True)
            print(f"screenshot: {ARTIFACTS / 'app-page.png'}")
            inner = distance_transform_edt(truth[0])
            inner[max(0, y - 6) : y + 7, max(0, x - 6) : x + 7] = 0  # a second positive click, elsewhere inside
            y2, x2 = np.unravel_index(np.argmax(inner), inner.shape)
            click(float(x2), float(y2))
            second = [read(0), read(1)]
            assert second != first  # the mask changed, refined by the click
            near = distance_transform_edt(~truth[0])  # a negative click just outside the object, near the first
            candidates = np.argwhere((near > 3) & (near < 8))
            outside = candidates[np.argmin(np.hypot(candidates[:, 0] - y, candidates[:, 1] - x))]
            click(float(outside[1]), float(outside[0]), shift=True)
            assert [read(0), read(1)] != second
            assert len(session.current.last.points) == 3 and session.current.last.labels == [1, 1, 0]
            # a dragged box on the base panel
            page.locator("#view-0").scroll_into_view_if_needed()
            frame = page.locator("#view-0").bounding_box()
            version = int(page.evaluate("document.body.dataset.version"))
            page.mouse.move(frame["x"] + 10, frame["y"] + 10)
            page.mouse.down()
            page.mouse.move(frame["x"] + 120, frame["y"] + 90, steps=5)
            page.mouse.up()
            page.wait_for_function(f"Number(document.body.dataset.version) > {version}", timeout=30_000)
            assert session.current.last.box is not None and session.current.last.box[2] > session.current.last.box[0]
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
