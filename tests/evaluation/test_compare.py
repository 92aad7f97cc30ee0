"""`tim compare`'s summary: one row per NFE, FID and accuracy per objective, the floor and each verdict."""

from components.evaluation.compare import table


def result(fids, mode, verdict=True):
    return {"ema": {f"nfe_{n}": {"fid": f, "accuracy": 0.5} for n, f in fids.items()}, "mode": mode,
            "floor": {"fid": 1.25, "accuracy": 0.99},
            "monotone": {"verdict": verdict, "worst_step": "1->2", "worst_increase": -3.0, "tolerance": 2.0}}


def test_table_has_a_row_per_nfe_and_a_verdict_per_objective():
    text = table({"fm": result({1: 300.0, 2: 150.0}, "diffusion"), "tim": result({1: 40.0, 2: 30.0}, "transition")})
    lines = text.splitlines()
    assert lines[0] == "| NFE | flow matching FID | flow matching acc | TiM FID | TiM acc |"
    assert lines[2] == "| 1 | 300.00 | 0.500 | 40.00 | 0.500 |" and lines[3].startswith("| 2 | 150.00")
    assert "FID 1.25" in text
    assert "flow matching (diffusion sampling): FID within noise as NFE grows: True" in text
