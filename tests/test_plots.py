"""Figures logged with every run say what their marks mean."""

import pandas as pd

from ltexp import plots


def test_accuracy_vs_count_has_a_legend_for_head_and_tail():
    per_class = pd.DataFrame({"train": [500, 200, 20, 5], "test_acc": [0.9, 0.8, 0.4, 0.1],
                              "group": ["head", "head", "tail", "tail"]})
    fig = plots.accuracy_vs_count(per_class)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["head classes", "tail classes"]
    offsets = [c.get_offsets().tolist() for c in fig.axes[0].collections]
    assert offsets == [[[500, 0.9], [200, 0.8]], [[20, 0.4], [5, 0.1]]]
    plots.close(fig)
