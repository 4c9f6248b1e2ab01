from scar.experiments.demo import DEMO_GRID, demo_grid
from scar.experiments.grid import expand, load_grid
from scar.methods import METHODS


def test_demo_grid_is_valid_and_covers_every_method():
    runs = expand(load_grid(demo_grid(forget_class=3, device="cpu")))
    methods = {r.method for r in runs}
    # every registered method, with the oracle as the "retrain" reference row
    assert methods == set(METHODS.names()) | {"original"}
    assert {r.forget_id for r in runs} == {"class3"}
    assert DEMO_GRID["classes"] == [0]  # demo_grid copies, never mutates the default
