import os
import stat

import pytest

from imkd_deploy.atomic import atomic_path, atomic_write_json, atomic_write_text


def test_written_file_is_complete_and_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644          # not mkstemp's 0600
    atomic_write_json(path, {"x": 1})
    assert path.read_text() == '{"x": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "b.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]
