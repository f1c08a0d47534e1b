"""Downstream suite: protocols end to end on a tiny synthetic world, scoring rules, metric extremes, input errors,
the paper-table writer, and resumable training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import trees
from core.data import DatasetError
from core.data import synthetic as S
from segmentation import protocols, tables
from segmentation.data import ImagePool, load_generated, oracle_tree
from segmentation.train import TrainSpec, batch_indices, train

CONFIGS = str(Path(__file__).parents[1] / "configs")
PRODUCTS = ("bottle", "pill")


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="eval_downstream", overrides=overrides)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dw")
    w = S.build_world(root / "synthetic" / "seed0_res64",
                      S.WorldConfig(resolution=64, n_train_good=4, n_test_good=3, n_per_type=3, products=PRODUCTS),
                      workers=1, progress=False)
    gen = root / "gen"
    for p in PRODUCTS:  # a stand-in generator: extra renders with exact masks, from another seed
        oracle_tree(gen, p, S.PRODUCTS[p].defects, 2, n_normals=2, seed=5, resolution=64)
    (gen / "manifest.jsonl").write_text(json.dumps({"method": "fakegen"}) + "\n")
    return w, gen


def _cfg(world, protocol, downstream="unet", extra=()):
    w, gen = world
    return _compose([f"protocol={protocol}", f"downstream={downstream}", f"dataset.root={w}", "dataset.resolution=64",
                     f"generated={gen}", "arms=[baseline,generated,oracle]", "oracle_per_type=2",
                     "limits.max_train_steps=2", "eval_batch_size=8", "grid_per_product=2", "image_size=32",
                     "++downstream.train.batch_size=4", *extra])


SMALL = {"unet": ["downstream.base=4"], "bisenetv2": ["downstream.head_channels=16", "downstream.aux_channels=[4,4,4,4]"]}


@pytest.mark.parametrize("protocol,downstream", [("seas", "bisenetv2"), ("anomalydiffusion", "unet"),
                                                 ("bgdefect", "unet"), ("defectdiffu", "unet")])
def test_every_protocol_runs_end_to_end_with_all_three_arms(world, tmp_path, protocol, downstream):
    cfg = _cfg(world, protocol, downstream, SMALL[downstream])
    md = protocols.eval_downstream(cfg, tmp_path)
    text = md.read_text()
    assert "fakegen" in text and "baseline" in text and "oracle" in text  # the generated arm is named by its manifest
    records = [r for f in sorted((tmp_path / "results").glob("*.json")) for r in json.loads(f.read_text())]
    folds = 2 if protocol == "bgdefect" else 1
    assert len(records) == 3 * len(PRODUCTS) * folds
    for r in records:
        for m in cfg.protocol.metrics:
            assert 0.0 <= r[m] <= 1.0, (m, r[m])
    units = {r["unit"] for r in records}
    assert units == ({"all"} if protocol == "seas" else set(PRODUCTS))  # SeaS: one unified model
    by_arm = {r["arm"]: r for r in records if r["product"] == "bottle" and r["fold"] == 0}
    n_types, n_real = len(S.PRODUCTS["bottle"].defects), {"seas": 1, "anomalydiffusion": 1, "bgdefect": 2,
                                                           "defectdiffu": 1}[protocol]
    assert by_arm["baseline"]["n_train_anomalies"] == n_types * n_real
    with_real = protocol in ("bgdefect", "defectdiffu")
    n_gen = {"defectdiffu": 2 * n_real}.get(protocol, 2)
    assert by_arm["generated"]["n_train_anomalies"] == n_types * (n_gen + (n_real if with_real else 0))
    assert by_arm["oracle"]["n_train_anomalies"] == by_arm["generated"]["n_train_anomalies"]
    if protocol == "anomalydiffusion":
        # the oracle tree, once written with 2 per type, serves a smaller count with exactly that many
        fewer = protocols.eval_downstream(_cfg(world, protocol, downstream, [*SMALL[downstream], "oracle_per_type=1"]),
                                          tmp_path / "one")
        one = [r for f in (fewer.parent / "results").glob("*.json") for r in json.loads(f.read_text())]
        assert {r["n_train_anomalies"] for r in one if r["product"] == "bottle" and r["arm"] == "oracle"} == {n_types}
    assert by_arm["baseline"]["n_train_normals"] == (0 if protocol == "defectdiffu" else 4)
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "table_summary.csv").is_file()
    assert any((tmp_path / "grids").glob("*.png"))
    assert not (tmp_path / "checkpoints").exists()  # keep_checkpoints=false: a finished unit keeps only its results
    # a rerun in the same run directory reuses the finished units instead of training again
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "results").glob("*.json")}
    protocols.eval_downstream(cfg, tmp_path)
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "results").glob("*.json")} == before


def test_a_rerun_with_other_images_or_another_model_is_refused_not_relabelled(world, tmp_path):
    """Finished units are reused on a rerun; so a rerun whose generated folder or downstream model differs must be
    refused before it prints old numbers under the new label (and must change no file)."""
    import shutil
    from core.runs import RunIdentityError
    w, gen = world
    cfg = _cfg(world, "anomalydiffusion", "unet", SMALL["unet"] + ["arms=[generated]", "products=[bottle]"])
    run = tmp_path / "run"
    protocols.eval_downstream(cfg, run)
    snapshot = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    gen2 = tmp_path / "gen2"
    shutil.copytree(gen, gen2)
    ty = S.PRODUCTS["bottle"].defects[0]
    (gen2 / "bottle" / "test" / ty / "0001.png").unlink()
    (gen2 / "bottle" / "ground_truth" / ty / "0001_mask.png").unlink()
    with pytest.raises(RunIdentityError, match=r"generated: .*inputs.generated: '[0-9a-f]+' -> '[0-9a-f]+'"):
        protocols.eval_downstream(_cfg(world, "anomalydiffusion", "unet", SMALL["unet"] + [
            "arms=[generated]", "products=[bottle]", f"generated={gen2}"]), run)
    with pytest.raises(RunIdentityError, match="downstream.name: 'unet' -> 'bisenetv2'"):
        protocols.eval_downstream(_cfg(world, "anomalydiffusion", "bisenetv2", SMALL["bisenetv2"] + [
            "arms=[generated]", "products=[bottle]"]), run)
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == snapshot
    protocols.eval_downstream(cfg.copy(), run)  # the same run again (on another device, say) still resumes
    protocols.eval_downstream(OmegaConf.merge(cfg, {"device": "cpu", "keep_checkpoints": True}), run)


def test_two_fold_protocol_takes_one_generated_folder_per_fold_and_refuses_a_generator_of_the_other_fold(world,
                                                                                                          tmp_path):
    """bgdefect trains one generator per fold; fold f's generator has trained on the anomalies fold 1-f tests on. So
    generated=<dir with {fold}> gives each fold its own folder, and a folder whose records name another fold than the
    one it serves is refused before anything is trained."""
    import shutil
    w, gen = world
    ty = S.PRODUCTS["bottle"].defects[0]
    for f in (0, 1):
        d = tmp_path / f"gen_fold{f}"
        shutil.copytree(gen, d)
        (d / "manifest.jsonl").write_text(json.dumps({"method": "fakegen", "product": "bottle", "fold": f}) + "\n")
    (tmp_path / "gen_fold1" / "bottle" / "test" / ty / "0001.png").unlink()    # fold 1's folder: one image fewer
    (tmp_path / "gen_fold1" / "bottle" / "ground_truth" / ty / "0001_mask.png").unlink()
    extra = SMALL["unet"] + ["arms=[generated]", "products=[bottle]", "protocol.generated_per_type=2"]
    protocols.eval_downstream(_cfg(world, "bgdefect", "unet", extra + [f"generated='{tmp_path}/gen_fold{{fold}}'"]),
                              tmp_path / "run")
    n = {f: json.loads((tmp_path / "run" / "results" / f"generated_fold{f}_bottle.json").read_text())[0]
         ["n_train_anomalies"] for f in (0, 1)}
    T = len(S.PRODUCTS["bottle"].defects)      # real per type: 2 in fold 0, 1 in fold 1 (3 split in halves); 2 generated
    assert (n[0], n[1]) == (T * (2 + 2), T * (1 + 2) - 1)     # each fold trained on its own folder
    for given, fold in ((f"{tmp_path}/gen_fold0", 1), (f"{tmp_path}/gen_fold1", 0)):  # one fold's folder for both
        with pytest.raises(DatasetError, match=rf"trained on fold\(s\) \[{1 - fold}\], but it is used for fold {fold}"
                                               rf".*generated='runs/gen_fold\{{fold\}}'"):
            protocols.eval_downstream(_cfg(world, "bgdefect", "unet", extra + [f"generated={given}"]), tmp_path / "x")
    (tmp_path / "gen_fold0").rename(tmp_path / "swap")
    (tmp_path / "gen_fold1").rename(tmp_path / "gen_fold0")
    (tmp_path / "swap").rename(tmp_path / "gen_fold1")
    with pytest.raises(DatasetError, match="point the fold-0 folder at the output of the fold-0 run"):
        protocols.eval_downstream(_cfg(world, "bgdefect", "unet", extra + [f"generated='{tmp_path}/gen_fold{{fold}}'"]),
                                  tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / "results").exists()


def test_an_all_zero_mask_is_an_error_by_default_and_left_out_on_request(world, tmp_path):
    import shutil
    w, gen = world
    gen2 = tmp_path / "gen_empty"
    shutil.copytree(gen, gen2)
    ty = S.PRODUCTS["bottle"].defects[0]
    empty = gen2 / "bottle" / "ground_truth" / ty / "0000_mask.png"
    Image.fromarray(np.zeros(np.array(Image.open(empty)).shape, np.uint8)).save(empty)
    extra = SMALL["unet"] + ["arms=[generated]", "products=[bottle]", f"generated={gen2}"]
    with pytest.raises(DatasetError, match=r"1 anomalous image\(s\) have an all-zero mask \(.*0000_mask.png\)"):
        protocols.eval_downstream(_cfg(world, "anomalydiffusion", "unet", extra), tmp_path / "a")
    assert not (tmp_path / "a" / "results").exists()
    with pytest.warns(UserWarning, match="left out 1 anomalous image"):
        protocols.eval_downstream(_cfg(world, "anomalydiffusion", "unet", extra + ["empty_masks=drop"]),
                                  tmp_path / "b")
    (rec,) = json.loads((tmp_path / "b" / "results" / "generated_fold0_bottle.json").read_text())
    n_types = len(S.PRODUCTS["bottle"].defects)
    assert rec["n_train_anomalies"] == n_types * 2 - 1  # 2 generated per type (this protocol adds no real), less one


def test_split_keeps_train_and_test_disjoint_in_every_arm(world, tmp_path):
    cfg = _cfg(world, "anomalydiffusion", "unet", SMALL["unet"])
    table = protocols.load_from_config(cfg.dataset)
    split = protocols.apply_split(table, "one_third")
    _, gen = world
    generated = load_generated(gen, PRODUCTS)
    for arm in ("baseline", "generated", "oracle"):
        pool = protocols.arm_anomalies(cfg, arm, ["bottle"], split.train, 0, generated)
        assert not {s.path for s in pool} & {s.path for s in split.test}
        assert all(s.product == "bottle" and s.label == 1 for s in pool)


@pytest.mark.parametrize("task", ["type_classification", "binary_classification"])
def test_classifier_protocols_run_end_to_end(world, tmp_path, task):
    name = {"type_classification": "resnet34", "binary_classification": "resnet50"}[task]
    cfg = _cfg(world, "anomalydiffusion" if name == "resnet34" else "defectdiffu", name,
               ["limits.max_products=1", "arms=[baseline,generated]", "keep_checkpoints=true"])
    protocols.eval_downstream(cfg, tmp_path)
    assert sorted(f.name for f in (tmp_path / "checkpoints").iterdir()) == [
        f"{arm}_fold0_{p}.pt" for arm in ("baseline", "generated") for p in PRODUCTS[:1]]
    records = [r for f in (tmp_path / "results").glob("*.json") for r in json.loads(f.read_text())]
    assert len(records) == 2 and all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert "Acc" in (tmp_path / "table.md").read_text()


def test_image_score_rule_follows_the_protocol(world):
    hot = torch.zeros(1, 64, 64)
    hot[0, 10, 10] = 1.0
    seas, ad = _cfg(world, "seas"), _cfg(world, "anomalydiffusion")
    assert protocols.score_images(seas, hot).item() == 1.0  # max of the map
    assert protocols.score_images(ad, hot).item() == pytest.approx(1 / 441)  # 21x21 average pool first
    ad.protocol.pooled_kernel = 5                                             # the protocol's kernel, not 21
    assert protocols.score_images(ad, hot).item() == pytest.approx(1 / 25)


def test_perfect_predictor_scores_one_and_constant_predictor_half(world):
    cfg = _cfg(world, "anomalydiffusion")
    rng = np.random.default_rng(0)
    masks = torch.zeros(6, 32, 32)
    for i in range(3):  # three anomalous images, three normal
        y, x = rng.integers(0, 24, 2)
        masks[i, y:y + 6, x:x + 6] = 1
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    perfect = protocols.segmentation_metrics(cfg, masks.clone(), masks, labels)
    assert all(v == pytest.approx(1.0) for v in perfect.values()), perfect
    const = protocols.segmentation_metrics(cfg, torch.full_like(masks, 0.3), masks, labels)
    assert const["image_auroc"] == pytest.approx(0.5) and const["pixel_auroc"] == pytest.approx(0.5)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_generated_folder_with_missing_mask_fails_clearly(world, tmp_path):
    gen = _copy_tree(world[1], tmp_path / "g")
    victim = next((gen / "bottle" / "ground_truth").rglob("*_mask.png"))
    victim.unlink()
    with pytest.raises(DatasetError) as e:
        load_generated(gen, ["bottle"])
    assert victim.name.replace("_mask", "") in str(e.value) or "mask" in str(e.value).lower()


def test_generated_folder_with_wrong_mask_size_fails_clearly(world, tmp_path):
    gen = _copy_tree(world[1], tmp_path / "g")
    victim = next((gen / "bottle" / "ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(victim)
    with pytest.raises(DatasetError) as e:
        load_generated(gen, ["bottle"])
    assert str(victim) in str(e.value) and "12x10" in str(e.value)


def test_generated_folder_lacking_a_product_or_with_unknown_types_fails_clearly(world, tmp_path):
    with pytest.raises(DatasetError, match="cable"):
        load_generated(world[1], ["bottle", "cable"])
    with pytest.raises(DatasetError, match="not a directory"):
        load_generated(tmp_path / "nope", ["bottle"])
    with pytest.raises(DatasetError, match="not have"):
        load_generated(world[1], ["bottle"], {"bottle": ["scratch"]})


def test_arm_errors_are_actionable(world):
    with pytest.raises(ValueError, match="generated=/path"):
        protocols.resolve_arms(_compose(["arms=[baseline,generated]"]))
    with pytest.raises(ValueError, match="synthetic world"):
        protocols.resolve_arms(_compose(["dataset=mvtec_ad", "arms=[oracle]"]))


def test_a_generated_folder_always_gets_its_arm():
    # experiment=downstream_synthetic lists [baseline, oracle]; generated=<dir> on the command line must not be ignored
    assert protocols.resolve_arms(_compose(["arms=[baseline,oracle]", "generated=/g"])) == ["baseline", "generated",
                                                                                             "oracle"]
    assert protocols.resolve_arms(_compose(["generated=/g"])) == ["baseline", "generated"]
    assert protocols.resolve_arms(_compose([])) == ["baseline"]


# ----------------------------------------------------------------------------- tables


def _paper_as_records(name, dataset, downstream):
    paper = tables.load_paper(name, dataset, downstream)
    return [{"label": k.removeprefix("paper: "), "product": p, "fold": 0, **ms}
            for k, per in paper.items() for p, ms in per.items() if p != tables.AVERAGE]


def test_summary_table_reproduces_seas_table_4_layout():
    paper = tables.load_paper("seas_tab4", "mvtec_ad", "bisenetv2")
    # the paper's averages, fed as one "product" each, come back out as the paper's rows
    records = [{"label": k.removeprefix("paper: "), "product": "x", "fold": 0, **per[tables.AVERAGE]}
               for k, per in paper.items()]
    metrics = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_iou"]
    header, rows = tables.summary_table(tables.fold_average(records, metrics), metrics, "bisenetv2")
    md = tables.markdown(header, rows)
    assert md.splitlines()[0] == ("| Segmentation model | Generative model | Image AUROC | Image AP | Image F1-max | "
                                  "Pixel AUROC | Pixel AP | Pixel F1-max | Pixel IoU |")
    assert "| BiSeNet V2 | SeaS | 96.00 | 98.14 | 95.43 | 97.21 | 69.21 | 66.37 | 55.28 |" in md
    assert "| BiSeNet V2 | DFMGAN | 90.90 | 94.43 | 90.33 | 94.57 | 60.42 | 60.54 | 45.83 |" in md
    assert tables.load_paper("seas_tab4", "synthetic", "bisenetv2") == {}  # published numbers only for their dataset


def test_per_product_table_reproduces_anomalydiffusion_table_2_rows_and_average():
    records = _paper_as_records("anomalydiffusion_tab2_tab3", "mvtec_ad", "unet")
    metrics = ["pixel_auroc", "pixel_ap", "pixel_f1_max"]
    res = tables.fold_average([r for r in records if r["label"] == "AnomalyDiffusion"], metrics)
    header, rows = tables.per_product_tables(res, metrics)["pixel"]
    assert header == ["Category", "AnomalyDiffusion AUROC", "AnomalyDiffusion AP", "AnomalyDiffusion F1-max"]
    assert ["bottle", "99.4", "94.1", "87.3"] in rows and rows[-1][0] == "Average"
    assert len(rows) == 16  # 15 MVTec AD categories + Average
    # the recomputed mean of the typed-in AUROC rows matches the paper's own Average row (to its rounding); the
    # paper's AP / F1-max Average cells are not the mean of its rows (82.2 / 77.1 vs printed 81.4 / 76.3)
    published = tables.load_paper("anomalydiffusion_tab2_tab3", "mvtec_ad")["paper: AnomalyDiffusion"]["Average"]
    assert abs(float(rows[-1][1]) - 100 * published["pixel_auroc"]) <= 0.15


def test_headroom_reports_the_share_of_the_gap_a_generator_closes():
    recs = [{"label": "baseline", "product": "a", "fold": 0, "pixel_ap": 0.2},
            {"label": "oracle", "product": "a", "fold": 0, "pixel_ap": 0.6},
            {"label": "gen", "product": "a", "fold": 0, "pixel_ap": 0.5}]
    lines = tables.headroom(tables.fold_average(recs, ["pixel_ap"]), ["pixel_ap"])
    assert lines[-1] == "| Pixel AP | 20.00 | 60.00 | +40.00 | 0.75 |"


def test_per_product_headroom_is_each_products_own_share_and_their_mean():
    rec = lambda label, prod, ap, iou: {"label": label, "product": prod, "fold": 0, "pixel_ap": ap,  # noqa: E731
                                        "pixel_iou": iou}
    recs = [rec("baseline", "a", 0.2, 0.0), rec("oracle", "a", 0.6, 0.5), rec("gen", "a", 0.5, 0.1),
            rec("baseline", "b", 0.5, 0.3), rec("oracle", "b", 0.6, 0.3), rec("gen", "b", 0.4, 0.2)]
    lines = tables.headroom_per_product(tables.fold_average(recs, ["pixel_ap", "pixel_iou"]))
    assert lines[2] == "| a | 0.75 | 0.20 |"
    assert lines[3] == "| b | -1.00 | - |"          # b's IoU gap is zero
    assert lines[4] == "| mean of the products' shares | -0.12 | 0.20 |"   # (0.75 - 1.00) / 2, not the averaged AP's


# ----------------------------------------------------------------------------- training loop


def test_batches_mix_anomalies_and_normals_as_configured():
    ia, inn = batch_indices(10, 50, TrainSpec(batch_size=8, anomaly_fraction=0.5), step=3)
    assert len(ia) == 4 and len(inn) == 4
    ia, inn = batch_indices(10, 50, TrainSpec(batch_size=8, anomaly_fraction=None), step=3)
    assert len(ia) + len(inn) == 8
    assert batch_indices(10, 50, TrainSpec(), 7) == batch_indices(10, 50, TrainSpec(), 7)


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)`")
def test_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path):
    from segmentation.unet import DiscriminativeUNet

    d = trees.mvtec_ad(tmp_path / "t", products=("widget",), n_per_type=2)
    samples = protocols.load_from_config(OmegaConf.create({"name": "mvtec_ad", "root": str(d)}))
    anomalies = ImagePool([s for s in samples if s.label == 1], 32)
    normals = ImagePool([s for s in samples if s.label == 0], 32)
    spec = TrainSpec(steps=4, batch_size=4, checkpoint_every=2, lr=1e-2)

    torch.manual_seed(0)
    a = DiscriminativeUNet(base=4)
    train(a, anomalies, normals, spec, tmp_path / "a.pt")

    torch.manual_seed(0)
    b = DiscriminativeUNet(base=4)
    train(b, anomalies, normals, TrainSpec(**{**spec.__dict__, "steps": 4}), tmp_path / "b.pt")
    # simulate a kill after step 2: restart from the step-2 checkpoint written by a 2-step run
    torch.manual_seed(0)
    c = DiscriminativeUNet(base=4)
    ckpt = tmp_path / "c.pt"
    spec2 = TrainSpec(**{**spec.__dict__})
    import segmentation.train as T
    calls = {"n": 0}
    orig = T.make_optimizer

    def crash_after_two(model, s):
        opt, sched = orig(model, s)
        step = opt.step

        def counting_step(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return step(*args, **kw)
        opt.step = counting_step
        return opt, sched

    T.make_optimizer = crash_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            train(c, anomalies, normals, spec2, ckpt)
    finally:
        T.make_optimizer = orig
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    d2 = DiscriminativeUNet(base=4)
    out = train(d2, anomalies, normals, spec2, ckpt)
    assert out["resumed_from"] == 2
    for (k, va), vb in zip(a.state_dict().items(), d2.state_dict().values()):
        assert torch.equal(va, vb), k
    for va, vb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(va, vb)


def test_patchcore_and_draem_protocols_run_end_to_end(world, tmp_path):
    pc = _cfg(world, "seas", "patchcore", ["downstream.backbone=resnet18", "downstream.preprocess_dim=32",
                                          "downstream.target_dim=32"])
    protocols.eval_downstream(pc, tmp_path / "pc")
    recs = [r for f in (tmp_path / "pc" / "results").glob("*.json") for r in json.loads(f.read_text())]
    assert sorted((r["arm"], r["product"]) for r in recs) == sorted(
        (a, p) for a in ("baseline", "generated", "oracle") for p in PRODUCTS)   # every product of the unified unit
    n = {(r["arm"], r["product"]): r["n_train_normals"] for r in recs}
    assert all(n[("baseline", p)] == 4 and n[("generated", p)] == n[("oracle", p)] == 4 + 2 for p in PRODUCTS)
    assert len(list((tmp_path / "pc" / "grids").glob("baseline_fold0_all_*.png"))) == 2   # one grid per product
    assert all("pixel_iou" not in r and 0 <= r["pixel_auroc"] <= 1 for r in recs)
    dr = _cfg(world, "anomalydiffusion", "draem", ["downstream.recon_base=4", "downstream.seg_base=4",
                                                   "limits.max_products=1"])
    protocols.eval_downstream(dr, tmp_path / "dr")
    recs = [r for f in (tmp_path / "dr" / "results").glob("*.json") for r in json.loads(f.read_text())]
    assert {r["arm"]: r["n_train_anomalies"] for r in recs}["baseline"] == 0  # plain DRAEM: simulated only
    assert all(0 <= r["pixel_ap"] <= 1 for r in recs)


class _TinyInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 5)

    def forward(self, x):
        f = self.conv(x).mean((2, 3))
        return f, self.head(f)


class _L1(torch.nn.Module):
    def forward(self, a, b):
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_eval_generation_writes_a_per_product_table(world, tmp_path):
    from segmentation.generation_eval import eval_generation

    w, gen = world
    (gen / ".sweep" / "bottle").mkdir(parents=True, exist_ok=True)  # a generation multirun's job folder: no product
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="eval_generation",
                      overrides=[f"dataset.root={w}", "dataset.resolution=64", f"generated={gen}",
                                 "ic_lpips_variant.resize=null", "metrics.extractor=inception"])
    md = eval_generation(cfg, tmp_path, extractor=_TinyInception(), lpips_model=_L1()).read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Category | IS | IC-LPIPS | IC-LPIPS(a) | KID | Alignment |"
    assert lines[1].endswith(" - |") and "records no source normal image" in md   # the fake manifest names none
    assert [line.split(" | ")[0][2:] for line in lines[1:]] == ["bottle", "pill", "Average"]
    cells = lines[1].split(" | ")
    assert float(cells[1]) >= 1.0  # IS is at least 1
    assert 0 < float(cells[3]) < float(cells[2])  # masked images differ less than whole images
    with pytest.raises(Exception, match="weights.inception"):
        eval_generation(cfg, tmp_path / "x")  # no local Inception file: the error names the config key


def test_generation_paper_numbers_load_as_printed():
    paper = tables.load_paper("seas_tab1", "mvtec_ad", percent=False)
    assert paper["paper: SeaS"]["Average"] == {"is": 1.88, "ic_lpips": 0.34, "kid": 0.04, "ic_lpips_anomaly": 0.18}
    assert "kid" not in paper["paper: AnomalyDiffusion"]["Average"]  # not reported ("-") stays absent


def test_eval_generation_on_the_synthetic_world_uses_the_world_clip(world, tmp_path):
    """Default metrics on dataset=synthetic: IS / FID / KID / FID(a) in a CLIP's feature space and the CLIP score.
    Generated normals that are copies of the real training normals have FID and KID ~0."""
    import shutil

    from core.models.world_clip import ClipEncoder, build_world_clip
    from segmentation.generation_eval import eval_generation

    w, gen = world
    copy = tmp_path / "gen"
    shutil.copytree(gen, copy)
    for p in PRODUCTS:
        shutil.rmtree(copy / p / "train" / "good")
        shutil.copytree(w / p / "train" / "good", copy / p / "train" / "good")
    arch = {"image_size": 64, "patch_size": 16, "max_length": 24, "projection_dim": 8,
            "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
            "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}}
    # the manifest names each anomaly's source normal image (as generators that edit a real image do): alignment
    records = []
    for p in PRODUCTS:
        src = sorted((w / p / "train" / "good").glob("*.png"))[0]
        for img in sorted((copy / p / "test").rglob("*.png")):
            records.append({"kind": "anomaly", "product": p, "image": str(img.relative_to(copy)), "source": str(src)})
    (copy / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model, tok = build_world_clip(arch)
    clip = ClipEncoder(model.eval(), tok, 64)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="eval_generation",
                      overrides=[f"dataset.root={w}", "dataset.resolution=64", f"generated={copy}"])
    md = eval_generation(cfg, tmp_path / "run", clip=clip).read_text()
    assert "world-CLIP" in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Category | IS | FID | KID | FID(a) | CLIP score | Alignment |"
    for line in lines[1:3]:
        cells = [float(c) for c in line.strip("| ").split(" | ")[1:]]
        assert cells[0] >= 1.0 and abs(cells[1]) < 1e-3 and abs(cells[2]) < 1e-3  # identical normals: FID, KID ~0
        assert cells[3] > 1e-3 and 0 <= cells[4] <= 100  # FID(a): other real defects, not the same images
        assert 0 <= cells[5] <= 1   # another render than the source: some change falls outside the mask
    # an anomaly-only folder (no generated normals): the default set leaves out FID / KID and says so; asking for KID
    # by name still stops with the fix
    for p in PRODUCTS:
        shutil.rmtree(copy / p / "train" / "good")
    md = eval_generation(cfg, tmp_path / "run2", clip=clip).read_text()
    header = [line for line in md.splitlines() if line.startswith("| ")][0]
    assert header == "| Category | IS | FID(a) | CLIP score | Alignment |" and "fid, kid (of generated normals" in md
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        named = compose(config_name="eval_generation", overrides=[f"dataset.root={w}", "dataset.resolution=64",
                                                                   f"generated={copy}", "metrics.names=[is,kid]"])
    with pytest.raises(DatasetError, match="normal images"):
        eval_generation(named, tmp_path / "run3", clip=clip)


def test_mask_alignment_is_the_share_of_changed_pixels_inside_the_mask():
    from core.metrics.generation import mask_alignment
    src = torch.zeros(3, 3, 4, 5)
    gen = src.clone()
    m = torch.zeros(3, 1, 4, 5)
    m[:, :, :2, :2] = 1
    gen[0, 1, :2, :2] = 0.5                      # 4 changed pixels, all inside: 1
    gen[1, 0, :2, :2] = 0.5
    gen[1, 2, 3, :] = 0.5                        # + 5 outside: 4 / 9
    gen[1, 2, 3, 0] = 0.05                       # below the threshold: not a change -> 4 / 8
    a = mask_alignment(gen, src, m)
    assert a[0] == 1.0 and a[1] == pytest.approx(4 / 8) and torch.isnan(a[2])   # item 2: nothing changed
    assert mask_alignment(gen, src, m[:, 0])[1] == a[1]


def test_clip_score_is_100_times_the_clipped_cosine():
    from segmentation.generation_eval import clip_score

    class Fixed:
        def image_embeds(self, x):
            return torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])[: len(x)]

        def text_embeds(self, prompts):
            return torch.tensor([[0.6, 0.8], [0.0, -1.0], [0.6, 0.8]])[: len(prompts)]

    # cosines 0.6, -1 (clipped to 0), 1.0 -> mean 100 * 1.6 / 3
    assert clip_score(Fixed(), torch.zeros(3, 3, 8, 8), ["a", "b", "c"]) == pytest.approx(100 * 1.6 / 3)


def test_best_clip_score_takes_each_image_s_closest_prompt():
    from segmentation.generation_eval import best_clip_score

    class Fixed:
        def image_embeds(self, x):
            return torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])[: len(x)]

        def text_embeds(self, prompts):
            return torch.tensor([[0.6, 0.8], [0.8, -0.6]])[: len(prompts)]

    # image 0: cosines 0.6, 0.8 -> 0.8; image 1: 0.8, -0.6 -> 0.8; image 2: -0.6, -0.8 -> -0.6, clipped to 0
    assert best_clip_score(Fixed(), torch.zeros(3, 3, 8, 8), ["a", "b"]) == pytest.approx(100 * 1.6 / 3)
    # one prompt: the plain CLIP score against that prompt for every image
    assert best_clip_score(Fixed(), torch.zeros(3, 3, 8, 8), ["a"]) == pytest.approx(100 * 1.4 / 3)


def _freely_named(gen: Path, dst: Path, word: str = "damaged") -> Path:
    """A copy of the stand-in generated folder whose anomalies are all filed under one free word (as CUT's are)."""
    import shutil
    shutil.copytree(gen, dst)
    for p in PRODUCTS:
        for sub in ("test", "ground_truth"):
            types = [d for d in (dst / p / sub).iterdir() if d.is_dir() and d.name != "good"]
            (dst / p / sub / word).mkdir()
            for d in types:
                for f in d.glob("*.png"):
                    f.rename(dst / p / sub / word / f"{d.name}_{f.name}")
                d.rmdir()
    return dst


def test_freely_named_anomalies_need_generated_types_free_and_then_pool_the_types(world, tmp_path):
    """CUT files its anomalies under its prompt's word ("damaged"), no dataset type: the default refuses the folder and
    names the fix; generated_types=free trains on it (protocol=cut), and eval_generation pools the product's types
    (FID(a)'s reference: as many real defects as generated, spread evenly over the types)."""
    from collections import Counter

    from core.models.world_clip import ClipEncoder, build_world_clip
    from segmentation.generation_eval import _oracle_anomalies, eval_generation

    w, gen = world
    free = _freely_named(gen, tmp_path / "free")
    n_gen = {p: len(list((free / p / "test" / "damaged").glob("*.png"))) for p in PRODUCTS}
    assert all(n == 2 * len(S.PRODUCTS[p].defects) for p, n in n_gen.items())
    cfg = _cfg(world, "cut", "vlad", ["arms=[generated]", "protocol.split.k=2", "downstream.stages=[2,4]",
                                      f"generated={free}"])
    with pytest.raises(DatasetError, match="generated_types=free"):
        protocols.eval_downstream(cfg, tmp_path / "refused")
    assert not (tmp_path / "refused" / "identity.json").exists()
    cfg.generated_types = "free"
    protocols.eval_downstream(cfg, tmp_path / "vlad")
    recs = [r for f in (tmp_path / "vlad" / "results").glob("*.json") for r in json.loads(f.read_text())]
    assert {r["product"]: r["n_train_anomalies"] for r in recs} == n_gen   # every freely named anomaly trains
    with pytest.raises(ValueError, match="type_classification needs"):   # no type to classify
        protocols.eval_downstream(_cfg(world, "seas", "resnet34", [f"generated={free}", "generated_types=free"]),
                                  tmp_path / "types")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        ev = compose(config_name="eval_generation",
                     overrides=[f"dataset.root={w}", "dataset.resolution=64", f"generated={free}",
                                "metrics.names=[fid_anomaly,clip_score]"])
    with pytest.raises(DatasetError, match="generated_types=free"):
        eval_generation(ev, tmp_path / "ev_refused")
    ev.generated_types = "free"
    ref = _oracle_anomalies(ev, "bottle", [None] * 7, ["stain", "crack", "missing"])
    assert Counter(s.anomaly_type for s in ref) == {"crack": 3, "missing": 2, "stain": 2}
    arch = {"image_size": 64, "patch_size": 16, "max_length": 24, "projection_dim": 8,
            "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
            "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}}
    model, tok = build_world_clip(arch)
    md = eval_generation(ev, tmp_path / "ev", clip=ClipEncoder(model.eval(), tok, 64)).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| Category | FID(a) | CLIP score |" and "generated_types=free" in md
    for line in rows[1:3]:
        fid_a, clip_s = (float(c) for c in line.strip("| ").split(" | ")[1:])
        assert fid_a > 0 and 0 <= clip_s <= 100   # "damaged" has no state prompt: the product's closest defect's


def test_cut_protocol_trains_one_vlad_on_generated_anomalies_with_k_normal_shots(world, tmp_path):
    """protocol=cut downstream=vlad: k = 2 normal shots per product; the baseline arm trains nothing (CLIP's zero-shot
    maps + the shots' memory bank), the generated arm trains one VLAD for both products (the unit "all")."""
    cfg = _cfg(world, "cut", "vlad", ["arms=[baseline,generated]", "protocol.split.k=2", "downstream.stages=[2,4]"])
    protocols.eval_downstream(cfg, tmp_path)
    recs = [r for f in (tmp_path / "results").glob("*.json") for r in json.loads(f.read_text())]
    by = {(r["arm"], r["product"]): r for r in recs}
    assert set(by) == {(a, p) for a in ("baseline", "generated") for p in PRODUCTS}
    assert all(r["n_train_normals"] == 2 and r["unit"] == "all" for r in recs)
    assert all(by[("baseline", p)]["n_train_anomalies"] == 0 and by[("baseline", p)]["steps"] == 0 for p in PRODUCTS)
    assert all(by[("generated", p)]["n_train_anomalies"] > 0 and by[("generated", p)]["steps"] == 2 for p in PRODUCTS)
    assert all(0 <= r["pixel_auroc"] <= 1 and 0 <= r["image_auroc"] <= 1 for r in recs)


def test_mambaad_trains_on_normals_once_for_all_products_and_adds_the_generated_normals(world, tmp_path):
    cfg = _cfg(world, "seas", "mambaad", ["image_size=64", "downstream.backbone=resnet18",
                                         "downstream.depths=[2,2,2,2]", "downstream.d_state=4",
                                         "downstream.num_direction=2", "downstream.scan_type=scan"])
    protocols.eval_downstream(cfg, tmp_path)
    recs = [r for f in (tmp_path / "results").glob("*.json") for r in json.loads(f.read_text())]
    n = {(r["arm"], r["product"]): r["n_train_normals"] for r in recs}
    assert set(n) == {(a, p) for a in ("baseline", "generated", "oracle") for p in PRODUCTS}
    assert all(n[("baseline", p)] == 4 and n[("generated", p)] == n[("oracle", p)] == 6 for p in PRODUCTS)
    assert all(r["unit"] == "all" and r["steps"] == 2 and 0 <= r["pixel_auroc"] <= 1 for r in recs)


def test_glass_protocol_simulates_in_the_baseline_and_takes_the_arms_anomalies_otherwise(world, tmp_path):
    cfg = _cfg(world, "seas", "glass", ["downstream.backbone=resnet18", "downstream.preprocess_dim=32",
                                       "downstream.target_dim=32", "downstream.dsc_hidden=32", "downstream.gas_steps=2",
                                       "downstream.centre_images=4"])
    protocols.eval_downstream(cfg, tmp_path)
    recs = [r for f in (tmp_path / "results").glob("*.json") for r in json.loads(f.read_text())]
    by = {(r["arm"], r["product"]): r for r in recs}
    assert set(by) == {(a, p) for a in ("baseline", "generated", "oracle") for p in PRODUCTS}
    assert all(by[("baseline", p)]["n_train_anomalies"] == 0 for p in PRODUCTS)          # LAS simulates them
    assert all(by[(a, p)]["n_train_anomalies"] > 0 for a in ("generated", "oracle") for p in PRODUCTS)
    assert all(r["steps"] == 2 and 0 <= r["pixel_auroc"] <= 1 and r["unit"] == "all" for r in recs)


def test_seas_tables_2_3_26_27_are_typed_in_and_found_by_downstream():
    """The protocol's paper list serves each downstream its own rows: Tab. 3 for MambaAD, Tab. 2 for GLASS, Tab. 26-27
    (per category) for LFD, Tab. 4 for BiSeNet V2; the papers' Average rows of Tab. 2/3 equal the mean of the rows."""
    from omegaconf import OmegaConf
    names = list(OmegaConf.load(CONFIGS + "/protocol/seas.yaml").paper)
    m = tables.load_paper(names, "mvtec_ad", "mambaad")
    assert set(m) == {"paper: none", "paper: SeaS"}
    assert m["paper: SeaS"][tables.AVERAGE]["pixel_ap"] == pytest.approx(0.5686)
    assert tables.load_paper(names, "visa", "glass")["paper: none"][tables.AVERAGE]["pixel_iou"] == pytest.approx(0.3992)
    lfd = tables.load_paper(names, "mvtec_ad", "lfd")
    assert set(lfd) == {"paper: DFMGAN", "paper: AnomalyDiffusion", "paper: SeaS"}
    assert lfd["paper: SeaS"]["bottle"]["pixel_iou"] == pytest.approx(0.7382)
    assert lfd["paper: SeaS"][tables.AVERAGE]["image_auroc"] == pytest.approx(0.9670)
    assert set(tables.load_paper(names, "mvtec_ad", "bisenetv2")) == {"paper: DFMGAN", "paper: AnomalyDiffusion",
                                                                      "paper: SeaS"}
    # Tab. 3's printed "Average(+ SeaS)" on MVTec AD pixel AP (56.46) is the mean of the three "+ SeaS" rows
    rows = [tables.load_paper("seas_tab2_tab3", "mvtec_ad", d)["paper: SeaS"][tables.AVERAGE]["pixel_ap"]
            for d in ("hvqtrans", "patchcore", "mambaad")]
    assert sum(rows) / 3 == pytest.approx(0.5646, abs=1e-4)


def test_hvqtrans_trains_once_for_all_products_with_a_codebook_set_each(world, tmp_path):
    cfg = _cfg(world, "seas", "hvqtrans", ["image_size=64", "downstream.backbone=resnet18", "downstream.stages=[1,2]",
                                          "downstream.hidden=16", "downstream.heads=2", "downstream.ff=32",
                                          "downstream.layers=2", "downstream.n_embed=8"])
    protocols.eval_downstream(cfg, tmp_path)
    recs = [r for f in (tmp_path / "results").glob("*.json") for r in json.loads(f.read_text())]
    n = {(r["arm"], r["product"]): r["n_train_normals"] for r in recs}
    assert set(n) == {(a, p) for a in ("baseline", "generated", "oracle") for p in PRODUCTS}
    assert all(n[("baseline", p)] == 4 and n[("generated", p)] == n[("oracle", p)] == 6 for p in PRODUCTS)
    assert all(r["unit"] == "all" and 0 <= r["pixel_auroc"] <= 1 for r in recs)


def test_lfd_runs_under_seas_with_ohem(world, tmp_path):
    cfg = _cfg(world, "seas", "lfd", ["image_size=64"])
    assert cfg.downstream.train.loss == "ohem"
    md = protocols.eval_downstream(cfg, tmp_path)
    recs = [r for f in (tmp_path / "results").glob("*.json") for r in json.loads(f.read_text())]
    assert {(r["arm"], r["product"]) for r in recs} == {(a, p) for a in ("baseline", "generated", "oracle")
                                                        for p in PRODUCTS}
    assert all(r["unit"] == "all" and r["steps"] == 2 for r in recs)
    assert "| LFD | baseline |" in md.read_text()            # the summary rows name the model as SeaS Tab. 4 does


def test_glass_killed_mid_training_resumes_to_the_uninterrupted_result(world, tmp_path):
    """GLASS's centre c lives in the model's buffers, so a run killed after its step-2 checkpoint and rerun reaches
    the same weights, and the same metrics, as one that was never interrupted (centre recomputed every 3 steps; the
    hypersphere distribution, where c sets the rings)."""
    import segmentation.train as T
    ov = ["downstream.backbone=resnet18", "downstream.preprocess_dim=32", "downstream.target_dim=32",
          "downstream.dsc_hidden=32", "downstream.gas_steps=2", "downstream.centre_images=4",
          "downstream.centre_every=3", "downstream.distribution=hypersphere", "limits.max_train_steps=5",
          "++downstream.train.checkpoint_every=2",
          "arms=[generated]", "protocol.unified=false", "products=[bottle]"]
    protocols.eval_downstream(_cfg(world, "seas", "glass", ov), tmp_path / "a")
    orig, calls = T.make_optimizer, {"n": 0}

    def crash(model, s):
        opt, sched = orig(model, s)
        real = opt.step

        def counting(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(*a, **k)
        opt.step = counting
        return opt, sched
    T.make_optimizer = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            protocols.eval_downstream(_cfg(world, "seas", "glass", ov + ["keep_checkpoints=true"]), tmp_path / "b")
    finally:
        T.make_optimizer = orig
    protocols.eval_downstream(_cfg(world, "seas", "glass", ov + ["keep_checkpoints=true"]), tmp_path / "b")
    a = json.loads(next((tmp_path / "a" / "results").glob("*.json")).read_text())
    b = json.loads(next((tmp_path / "b" / "results").glob("*.json")).read_text())
    for key in ("pixel_auroc", "pixel_ap", "image_auroc", "final_loss"):
        assert a[0][key] == b[0][key], key


def test_alignment_against_the_vae_round_trip_separates_the_method_from_its_prior(tmp_path):
    """A generated image that is the source's VAE round trip plus a change inside the mask: against the source the
    round trip's own changes count (alignment < 1); against the round trip (alignment_reference=vae) only the
    method's change does (alignment 1)."""
    import numpy as np
    from PIL import Image
    from core.data import load_folder
    from core.export import GeneratedWriter
    from core.models import build_random
    from segmentation.generation_eval import _alignment, vae_reference

    comp = build_random("tiny", seed=0)
    rng = np.random.default_rng(0)
    src = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    src_path = tmp_path / "src.png"
    Image.fromarray(src).save(src_path)
    y = torch.from_numpy(np.array(Image.open(src_path))).permute(2, 0, 1)[None].float() / 255
    ref = vae_reference(comp)
    gen = ref(y)[0].permute(1, 2, 0).numpy()
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:50] = True
    gen[mask] = np.clip(gen[mask] + 0.5, 0, 1)
    with GeneratedWriter(tmp_path / "gen", "bottle", "test", {}) as w:
        w.write_anomaly("crack", 0, (gen * 255).round().astype(np.uint8), mask, source=str(src_path))
        w.finalize()
    samples = [s for s in load_folder(tmp_path / "gen", ["bottle"]) if s.label == 1]
    plain = _alignment(tmp_path / "gen", samples)
    against_vae = _alignment(tmp_path / "gen", samples, ref)
    assert plain < 0.5 and against_vae == pytest.approx(1.0)
