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
