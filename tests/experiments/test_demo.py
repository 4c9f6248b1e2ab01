from scar.experiments.demo import DEMO_GRID, demo_grid
from scar.experiments.grid import expand, load_grid
from scar.methods import METHODS
from scar.methods.presets import PRESETS


def test_demo_grid_is_valid_and_covers_every_method():
    runs = expand(load_grid(demo_grid(forget_class=3, device="cpu")))
    methods = {r.method for r in runs}
    # SCAR, self-forget and the reference code's baselines (the methods of the reference
    # preset), with the oracle as the "retrain" reference row; the field's other methods are
    # registered but not in the demo (scar run with them)
    assert methods == set(PRESETS.get("reference").methods) | {"original", "retrain"}
    assert methods <= set(METHODS.names()) | {"original"}
    assert {r.forget_id for r in runs} == {"class3"}
    assert DEMO_GRID["classes"] == [0]  # demo_grid copies, never mutates the default
