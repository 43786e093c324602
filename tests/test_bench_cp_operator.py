def test_cp_operator_quick_runs_and_both_forms_agree():
    from benchmarks import cp_operator

    out = cp_operator.main(["--quick"])
    (row,) = out["rows"]
    assert row["rank"] > row["shape"][0] and row["chosen_by_default"]
    assert row["apply_ratio"] > 0 and row["update_ratio"] > 0
    # the same exact block minimiser: objectives after the B-update equal to its 1e-8 rule
    assert row["objective_spread"] < 1e-7
