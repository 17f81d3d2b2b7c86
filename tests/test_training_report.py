"""The training report's verdicts on per-epoch histories."""

from lakevision.training.report import convergence_epoch, overfitting_warning, training_report


def test_convergence_epoch_is_the_first_close_to_the_best():
    assert convergence_epoch([0.1, 0.4, 0.59, 0.6, 0.6]) == 3  # 0.59 is within 2% of 0.6
    assert convergence_epoch([2.0, 1.0, 0.5, 0.51], higher_is_better=False) == 3
    assert convergence_epoch([None, None]) is None


def test_overfitting_needs_rising_validation_and_falling_training_loss():
    train = [1.0, 0.8, 0.6, 0.4, 0.3]
    assert overfitting_warning(train, [1.0, 0.7, 0.6, 0.65, 0.7]).startswith(
        "overfitting: validation loss rose from 0.6 (epoch 3) to 0.7 (epoch 5)")
    assert overfitting_warning(train, [1.0, 0.8, 0.7, 0.65, 0.6]) is None  # still falling
    assert overfitting_warning(train, [1.0, 0.7, 0.6, 0.61, 0.62]) is None  # within the 5% margin
    assert overfitting_warning([1.0, 0.8, 0.6, 0.7, 0.9], [1.0, 0.7, 0.6, 0.7, 0.9]) is None  # both rose: diverging, not overfitting
    assert overfitting_warning(train, [1.0, 0.7, 0.6, 0.7, 0.59]) is None  # a new minimum at the end


def test_report_has_curves_and_summary():
    history = {"train_loss": [1.0, 0.8, 0.6, 0.4, 0.3], "val_loss": [1.0, 0.7, 0.6, 0.65, 0.7],
               "val_map_50": [0.1, 0.3, 0.5, 0.52, 0.51]}
    text, fig, summary = training_report(history, "val_map_50")
    assert summary == {"epochs": 5, "metric": "val_map_50", "convergence_epoch": 4, "overfitting": True,
                       "warning": "overfitting: validation loss rose from 0.6 (epoch 3) to 0.7 (epoch 5) while "
                                  "training loss fell from 0.6 to 0.3; the checkpoint kept is the best epoch's, and "
                                  "more data, augmentation or early stopping would help"}
    assert "converged at epoch 4" in text and "**overfitting:" in text
    assert len(fig.axes) == 2 and fig.axes[1].get_lines()
