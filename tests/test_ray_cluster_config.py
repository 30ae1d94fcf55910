"""ray_cluster.yaml must stay valid for Ray's own cluster launcher schema."""

import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_ray_cluster_yaml_matches_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert any(t.get("resources", {}).get("GPU") for t in config["available_node_types"].values())
    assert any("pip install" in c and "layerloop" in c for c in config["setup_commands"])
