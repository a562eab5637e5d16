"""The end-of-run table: the paper's five columns, and a later turn's only where it was evaluated."""

from callbacks.summary import format_table

TWO = {"acc_t1": 0.5, "acc_t2": 0.625, "delta": 0.125, "delta_i2c": 0.25, "delta_c2i": 0.125}
THREE = {**TWO, "acc_t3": 0.75, "delta_i2c_t2_t3": 0.125, "delta_c2i_t2_t3": 0.0}
THREE |= {"delta_i2c_t1_t3": 0.375, "delta_c2i_t1_t3": 0.125}


def test_two_turns_give_the_five_columns():
    header, row = format_table({"val/a": TWO}).splitlines()
    assert header.split() == ["Acc@t1", "Acc@t2", "Δ", "Δi→c", "Δc→i"]
    assert row.split() == ["val/a", "50.0%", "62.5%", "12.5%", "25.0%", "12.5%"]


def test_a_third_turn_adds_its_columns_and_leaves_two_turn_rows_blank_there():
    header, train, val = format_table({"train rollouts": TWO, "val/a": THREE}).splitlines()
    titles = ["Acc@t1", "Acc@t2", "Δ", "Δi→c", "Δc→i", "Acc@t3", "Δi→c(t2,t3)", "Δc→i(t2,t3)"]
    assert header.split() == [*titles, "Δi→c(t1,t3)", "Δc→i(t1,t3)"]
    assert val.split()[1:] == ["50.0%", "62.5%", "12.5%", "25.0%", "12.5%", "75.0%", "12.5%", "0.0%", "37.5%", "12.5%"]
    assert train.split() == ["train", "rollouts", "50.0%", "62.5%", "12.5%", "25.0%", "12.5%"]
