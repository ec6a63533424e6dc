"""`--dataset imagenet` on a generated folder of real WordNet ids, and experiments/wordnet.py (WordNet 3.0 from
Debian's wordnet-base, installed by `make setup`)."""
from __future__ import annotations

import json
from pathlib import Path

from experiments import train  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from experiments import wordnet  # noqa: E402
from experiments.cli import main as cli  # noqa: E402
from experiments.data import DataError, load_dataset, open_dataset  # noqa: E402
from models.errors import UserError  # noqa: E402

pytestmark = pytest.mark.skipif(not (Path(wordnet.WORDNET_DIR) / "data.noun").is_file(),
                                reason="WordNet 3.0 (apt-get install wordnet-base) not installed")
# tench, goldfish (fish); Chihuahua, tabby (mammals); bullet train (WordNet: a public_transport, not a
# wheeled_vehicle), convertible (a wheeled_vehicle)
WNIDS = ("n01440764", "n01443537", "n02085620", "n02123045", "n02917067", "n03100240")


def make_imagenet(root: Path, wnids=WNIDS, n: int = 4, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for split, k in (("train", n), ("val", 2)):
        for w in wnids:
            (root / split / w).mkdir(parents=True, exist_ok=True)
            for i in range(k):
                Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
                    root / split / w / f"{w}_{i}.JPEG")
    return root


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


def test_wordnet_paths_and_timm_synsets():
    wn = wordnet.load_wordnet()
    assert wn.synset("n01440764").names[0] == "tench"
    path = [wn.synset(w).name for w in wn.path("n02085620")]
    assert path[0] == "entity" and path[-1] == "Chihuahua" and "dog" in path and "mammal" in path
    synsets = wordnet.imagenet_synsets()
    assert len(synsets) == 1000 and synsets[0] == "n01440764" and synsets == sorted(synsets)
    g = wordnet.grouping(synsets, "depth4")
    assert len(g["fine_to_coarse"]) == 1000 and {"artifact (n00021939)", "living_thing (n00004258)"} <= set(
        g["coarse_names"])
    with pytest.raises(UserError, match=r"coarse='depth0': allowed depthN \(N = 1..12\), entity13"):
        wordnet.check_grouping("depth0")
    with pytest.raises(UserError, match="WordNet 3.0 not found: no data.noun/index.noun in /nowhere; install"):
        wordnet.WordNet("/nowhere")


def test_imagenet_folder_gets_coarse_labels_from_wordnet(inet):
    ds = open_dataset("imagenet", "train", data_dir=str(inet), img_size=16, coarse="depth5")
    assert ds.fine_names == [f"{n} ({w})" for n, w in zip(("tench", "goldfish", "Chihuahua", "tabby",
                                                             "bullet_train", "convertible"), WNIDS)]
    coarse = [ds.coarse_names[k] for k in ds.fine_to_coarse]
    assert coarse == ["organism (n00004475)"] * 4 + ["instrumentality (n03575240)"] * 2
    assert ds.info["hierarchy"]["grouping"] == "depth5" and not ds.info["hierarchy"]["approximation"]
    e13 = open_dataset("imagenet", "test", data_dir=str(inet), img_size=16, coarse="entity13")
    assert [e13.coarse_names[k] for k in e13.fine_to_coarse] == (
        ["other"] * 2 + ["mammal (n01861778)"] * 2 + ["other", "wheeled_vehicle (n04576211)"])
    assert len(e13) == 12 and e13.info["hierarchy"]["approximation"]
    mem = load_dataset("imagenet", "test", data_dir=str(inet), img_size=16)  # probes read it in memory
    assert mem.images.shape == (12, 3, 16, 16) and mem.fine_to_coarse == ds.fine_to_coarse


def test_imagenet_bad_input_is_one_line(inet, tmp_path):
    bad = make_imagenet(tmp_path / "bad", wnids=("n01440764", "cats"), n=1)
    with pytest.raises(DataError, match="folder 'cats' in .* is not an ImageNet-1k class id; allowed: the 1,000"):
        open_dataset("imagenet", "train", data_dir=str(bad))
    with pytest.raises(UserError, match="coarse='entity30': allowed"):
        open_dataset("imagenet", "train", data_dir=str(inet), coarse="entity30")
    with pytest.raises(DataError, match="imagenet needs --data-dir"):
        open_dataset("imagenet", "train")
    with pytest.raises(DataError, match="imagenet is only streamed"):
        open_dataset("imagenet", "train", data_dir=str(inet), mode="memory")


def test_train_cli_records_the_wordnet_grouping(inet, tmp_path, store):
    res = CliRunner().invoke(cli, ["train", "--model", "deit_micro", "--dataset", "imagenet", "--data-dir", str(inet),
                                   "--data-option", "img_size=16", "--data-option", "coarse=entity13", "--epochs",
                                   "1", "--batch-size", "8", "--workers", "0", "--checkpoint-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("stepslab").experiment_id],
                                     "tags.`stepslab.dataset` = 'imagenet'", max_results=1)[0]
    assert run.data.tags["stepslab.hierarchy"] == "entity13 (approximation)"
    assert run.data.params["data_options.coarse"] == "entity13"
    local = MlflowClient().download_artifacts(run.info.run_id, "hierarchy.json", str(tmp_path))
    saved = json.loads(Path(local).read_text())
    assert saved["coarse_names"][saved["fine_to_coarse"][2]] == "mammal (n01861778)"
    card = json.loads(Path(MlflowClient().download_artifacts(run.info.run_id, "model_info.json",
                                                             str(tmp_path))).read_text())
    assert card["hierarchy"] == "entity13" and card["num_coarse"] == 3  # other, mammal, wheeled_vehicle


def test_imagenet_hugging_face_parquet_layout(tmp_path, monkeypatch):
    """The hub's imagenet-1k layout (data/<split>-NNNNN-of-NNNNN.parquet, columns image and label = index in
    timm's synset order), converted once into datasets' memory-mapped cache and read row by row."""
    import io

    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    (tmp_path / "hf" / "data").mkdir(parents=True)
    for split, labels in (("train", [0, 1, 151, 999]), ("validation", [151, 999])):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": jpeg(i), "path": None} for i in range(len(labels))],
                                         "label": labels}).cast_column("image", datasets.Image())
        ds.to_parquet(str(tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet"))
    tr = open_dataset("imagenet", "train", data_dir=str(tmp_path / "hf"), img_size=16, coarse="depth4")
    assert len(tr) == 4 and tr.num_fine == 1000 and tr.fine.tolist() == [0, 1, 151, 999]
    assert tr.fine_names[151] == "Chihuahua (n02085620)"
    x, fine, coarse = tr[2]
    assert x.shape == (3, 16, 16) and tr.coarse_names[coarse] == "living_thing (n00004258)"
    assert len(open_dataset("imagenet", "test", data_dir=str(tmp_path / "hf"), img_size=16)) == 2
