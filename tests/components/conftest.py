import pytest

from components.studio import Studio
from lillama_core.jobs import JobManager
from lillama_core.planning.ranks import ModelShape


@pytest.fixture
def studio(tmp_path, tiny):
    """The app's server state on a tiny random Llama, runs and exports in a temporary folder."""
    s = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    s.loaded, s.shape = tiny, ModelShape.of(tiny.model)
    return s


@pytest.fixture
def measuring_studio(tmp_path, tiny):
    """Makes fresh studios (as after a launch) on the tiny model, their default plan measuring sensitivity on a
    small calibration file; studios made by one test share its runs folder and measurement cache."""
    from tiny import SAMPLE_TEXT

    from lillama_core.config import PlanConfig

    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 20)

    def make() -> Studio:
        s = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
        s.loaded, s.shape = tiny, ModelShape.of(tiny.model)
        s.calibration.source, s.calibration.tokens, s.calibration.seq_len = str(text), 512, 32
        s.plan_config = PlanConfig(reduction=0.1)
        return s

    return make
