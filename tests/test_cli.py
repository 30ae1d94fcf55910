import json

from layerloop.cli import main


def test_demo_data_build_inspect_trace(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "scenes"), "--n", "3", "--seed", "1", "--size", "64"]) == 0
    entries = json.loads((tmp_path / "scenes" / "meta.json").read_text())
    assert len(entries) == 3 and all(e["caption"] for e in entries)

    config = tmp_path / "c.yaml"
    config.write_text(
        "name: t\nseed: 0\nexecutor: local\n"
        f"source: {{type: rorem, path: {tmp_path / 'scenes'}, name: scenes}}\n"
        "stages:\n  - {stage: load, short_side: 64}\n  - {stage: trimap}\n  - {stage: matting}\n"
        "  - {stage: shadow}\n  - {stage: background, backend: gt}\n  - {stage: recompose}\n"
        "  - {stage: box-mask}\n  - {stage: caption}\n"
        "shards: {name: t, samples_per_shard: 2}\nreport: {rows: 2}\n")
    assert main(["build", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "samples written: 3, failed: 0" in out and "shards: 2" in out

    assert main(["inspect", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "scenes_scene_000000" in text or "scenes_scene_000001" in text

    assert main(["inspect", str(tmp_path / "run"), "--key", "scenes_scene_000002"]) == 0
    traced = json.loads(capsys.readouterr().out)
    assert traced["metadata"]["source_id"] == "scene_000002"
    assert traced["metadata"]["stages"]["background"]["backend"] == "gt"


def test_unknown_stage_parameter_is_a_clear_error(tmp_path, capsys):
    code = main(["build", "demo", "--out", str(tmp_path / "r"), "--executor", "local", "stages.matting.bogus=1"])
    assert code == 2
    assert "bogus" in capsys.readouterr().err
