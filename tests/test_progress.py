"""fewstep.progress: the progress(done, total) callback of pairs and cache drives one tqdm bar to the total."""

from fewstep.progress import Progress


def test_progress_callback_counts_to_the_total(capsys):
    progress = Progress("pairs", unit="pair")
    for done in (3, 7, 10):
        progress(done, 10)
        if done < 10:
            assert progress.bar.n == done and progress.bar.total == 10
    assert progress.bar is None  # closed when done reached the total
    err = capsys.readouterr().err
    assert "pairs" in err and "10/10" in err
    progress.close()  # closing again is harmless
