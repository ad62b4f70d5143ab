"""`navit-clip eval --task linear_probe`: the logistic regression equals an independent fit
(scikit-learn's), the weight decay is chosen on held-out training images, and the probe of a
frozen encoder beats chance clearly on images whose class is their colour, from a run and from an
export, with the result in CLIP_benchmark's JSON at RUN/eval/linear_probe.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from navit_clip.cli import main
from navit_clip.config import Config, ModelConfig, TextConfig, VisionConfig, config_to_dict
from navit_clip.data.shard_files import write_shards
from navit_clip.errors import InputError
from navit_clip.eval.linear_probe import WEIGHT_DECAYS, choose_weight_decay, fit_logistic
from navit_clip.export import export_image_encoder, load_image_encoder
from navit_clip.model.clip import NaViTCLIP

from conftest import png_bytes

CLASSES = ["red", "green", "blue"]


def blobs(n: int, dim: int = 5, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=gen) * 1.5
    return centres[labels] + torch.randn(n, dim, generator=gen), labels


def test_fit_equals_scikit_learn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(120)
    for decay in (1e-1, 1e-3):
        ours = torch.softmax(fit_logistic(x, y, 3, decay).logits(x), -1).numpy()
        # sklearn minimises C·Σ CE + ½‖W‖², the same optimum as mean CE + (decay/2)·‖W‖² with C = 1/(decay·n)
        ref = sklearn.LogisticRegression(C=1 / (decay * len(y)), tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
        np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=2e-4)


def test_separable_classes_are_fit_exactly_and_decay_is_chosen_on_held_out_images():
    x, y = blobs(200, dim=8, classes=4, seed=1)
    x = x + 6 * torch.nn.functional.one_hot(y, 8)[:, :8].float()  # far apart: linearly separable
    model = fit_logistic(x, y, 4, 1e-4)
    assert (model.logits(x).argmax(-1) == y).all()
    decay, holdout = choose_weight_decay(x, y, 4)
    assert decay in WEIGHT_DECAYS and set(holdout) == {f"{d:g}" for d in WEIGHT_DECAYS}
    assert holdout[f"{decay:g}"] == max(holdout.values()) == 1.0
    assert decay == WEIGHT_DECAYS[0]  # every candidate ties: the strongest is kept


def colour_image(label: int, rng: np.random.Generator) -> Image.Image:
    """A random-sized image whose dominant channel is its class, with noise."""
    h, w = (int(v) for v in rng.integers(12, 48, 2))
    pixels = rng.integers(0, 120, (h, w, 3))
    pixels[:, :, label] += 135
    return Image.fromarray(pixels.astype(np.uint8))


def colour_shards(root: Path, counts: dict[str, int]) -> dict[str, str]:
    rng = np.random.default_rng(0)
    specs = {}
    for split, n in counts.items():
        samples = [{"__key__": f"{split}{i:04d}", "png": png_bytes(colour_image(i % 3, rng)), "txt": CLASSES[i % 3],
                    "json": {"label": i % 3}} for i in range(n)]
        paths = write_shards(samples, str(root / f"{split}-%06d.tar"), max_per_shard=1000)
        specs[split] = paths[0]
    (root / "dataset.json").write_text(json.dumps({"class_names": CLASSES, "templates": ["a {} picture"],
                                                   "eval_shards": Path(specs["eval"]).name}))
    return specs


def tiny_model_config(specs: dict[str, str]) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(vision=VisionConfig(patch_size=4, width=32, depth=1, heads=2, max_grid_side=16),
                            text=TextConfig(width=32, depth=1, heads=2, context_length=8), embed_dim=16)
    cfg.data.seq_len, cfg.data.max_images, cfg.data.resolution.max_tokens = 64, 4, 32
    cfg.data.train_shards, cfg.data.eval_shards = specs["train"], specs["eval"]
    return cfg.validate()


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    specs = colour_shards(root, {"train": 60, "eval": 30})
    cfg = tiny_model_config(specs)
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.model).eval()
    ckpt = root / "run" / "checkpoints" / "step3"
    ckpt.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "step": 3, "config": config_to_dict(cfg)}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt.parent / "latest").write_text("step3")
    export = export_image_encoder(model, root / "export", max_tokens_per_image=32, seq_len=64, max_images=4)
    return root, specs, export


def reference_acc1(export: Path, specs: dict[str, str], decay: float) -> float:
    """The probe recomputed independently: the exported encoder on the decoded images, sklearn's fit."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from navit_clip.eval.datasets import navit_shards
    from navit_clip.data.shards import ReadStats

    encoder = load_image_encoder(export)

    def embed(spec: str):
        items = list(navit_shards(spec).read(ReadStats()))
        with torch.no_grad():
            return encoder([item.image for item in items]).double().numpy(), np.array([item.label for item in items])

    (x, y), (xt, yt) = embed(specs["train"]), embed(specs["eval"])
    ref = sklearn.LogisticRegression(C=1 / (decay * len(y)), tol=1e-12, max_iter=10_000).fit(x, y)
    return float((ref.predict(xt) == yt).mean())


def test_cli_probe_of_a_run_uses_its_training_shards(probe_setup, capsys):
    root, specs, export = probe_setup
    assert main(["eval", "--run", str(root / "run"), "--task", "linear_probe"]) == 0
    assert "linear probe (fit on 60 images" in capsys.readouterr().out
    record = json.loads((root / "run" / "eval" / "linear_probe.json").read_text())
    assert record["task"] == "linear_probe" and record["pretrained"].endswith("@step3")
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    details = record["details"]
    assert details["num_train_images"] == 60 and details["num_images"] == 30 and details["num_classes"] == 3
    assert record["metrics"]["acc1"] >= 0.8 > 1 / 3 + 0.3  # chance is 1/3
    assert record["metrics"]["acc1"] == pytest.approx(reference_acc1(export, specs, details["weight_decay"]), abs=1 / 30)


def test_cli_probe_of_an_export_needs_training_data(probe_setup, tmp_path, capsys):
    root, specs, export = probe_setup
    assert main(["eval", "--run", str(export), "--task", "linear_probe", "--data", specs["eval"]]) == 2
    assert "--train-data" in capsys.readouterr().err
    out = tmp_path / "probe.json"
    assert main(["eval", "--run", str(export), "--task", "linear_probe", "--data", specs["eval"],
                 "--train-data", specs["train"], "--budgets", "16", "--out", str(out)]) == 0
    record = json.loads(out.read_text())  # no text tower needed
    assert record["details"]["max_tokens_per_image"] == 16 and record["details"]["tokens_per_image"] <= 16
    assert record["metrics"]["acc1"] >= 0.8


def test_unlabelled_training_data_is_refused(probe_setup, tmp_path):
    from navit_clip.eval.run import run_eval

    root, specs, export = probe_setup
    (tmp_path / "pairs.csv").write_text("path,caption\nx.png,a picture\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(InputError, match="no class labels"):
        run_eval(export, specs["eval"], task="linear_probe", train_data=str(tmp_path / "pairs.csv"), progress=False)
