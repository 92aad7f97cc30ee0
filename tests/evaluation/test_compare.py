"""`tim compare`'s summary: per guidance scale a row per NFE with every run's FID and accuracy, the floor, each
run's seed noise and verdict, and TiM against the strongest flow-matching variant, named."""

from components.evaluation.compare import strongest_fm, table


def result(fids, mode, guided=None, verdict=True):
    def figures(per_nfe):
        return {"ema": {f"nfe_{n}": {"fid": f, "accuracy": 0.5} for n, f in per_nfe.items()},
                "monotone": {"verdict": verdict, "worst_step": "1->2", "worst_increase": -3.0, "tolerance": 2.0,
                             "fid_noise_sd": 0.75}}
    scales = {"1": figures(fids), **({"1.5": figures(guided)} if guided else {})}
    return {**scales["1"], "scales": scales, "mode": mode, "floor": {"fid": 1.25, "accuracy": 0.99}}


def test_table_per_scale_and_tim_against_the_strongest_flow_matching():
    results = {
        "fm-uniform": result({1: 300.0, 2: 150.0}, "diffusion", {2: 280.0, 4: 140.0}),
        "fm-max-of-two": result({1: 500.0, 2: 60.0}, "diffusion", {2: 450.0, 4: 55.0}),  # geo-mean 173 < 212
        "tim": result({1: 40.0, 2: 80.0}, "transition", {2: 30.0, 4: 25.0}),
    }
    assert strongest_fm(results) == "fm-max-of-two"   # the arithmetic mean would pick fm-uniform (225 < 280)
    lines = table(results).splitlines()
    assert lines[0] == "Guidance scale 1 (unguided):"
    assert lines[2] == ("| NFE | FM, uniform t (SiT) FID | acc | FM, max of two draws FID | acc | TiM FID | acc |")
    assert lines[4] == "| 1 | 300.00 | 0.500 | 500.00 | 0.500 | 40.00 | 0.500 |"
    assert "Guidance scale 1.5:" in lines and "| 4 | 140.00 | 0.500 | 55.00 | 0.500 | 25.00 | 0.500 |" in lines
    text = "\n".join(lines)
    assert "TiM (transition sampling): FID seed-to-seed sd 0.75; within noise as NFE grows: True" in text
    assert "FID 1.25" in text
    assert lines[-1] == ("Strongest flow matching on this budget (unguided, geometric-mean FID): FM, max of two "
                         "draws. TiM's FID is below it at 1 of 2 NFEs (1).")
