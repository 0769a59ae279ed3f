"""scripts/mutation_record.py: mutmut's decided results survive a fresh checkout, and mutmut's own
merge keeps only those of unchanged functions."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "scripts", "mutation_record.py")
_spec = importlib.util.spec_from_file_location("mutation_record", _PATH)
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

_CODES = {"cbp.core.lagrangian.xǁLagrangianǁstep__mutmut_1": 1,
          "cbp.core.lagrangian.xǁLagrangianǁstep__mutmut_2": 0,
          "cbp.core.lagrangian.xǁLagrangianǁstep__mutmut_3": None,
          "cbp.core.lagrangian.x_helper__mutmut_12": 33}
_HASHES = {"xǁLagrangianǁstep": "aaaa", "x_helper": "bbbb"}


def _write_meta(root, codes, hashes):
    os.makedirs(root / "cbp" / "core")
    meta = {"exit_code_by_key": codes, "hash_by_function_name": hashes, "type_check_error_by_key": {},
            "durations_by_key": {"x": 1.0}, "estimated_durations_by_key": {}}
    (root / "cbp" / "core" / "lagrangian.py.meta").write_text(json.dumps(meta), encoding="utf-8")


def test_saved_results_are_restored_as_mutmut_meta_files_without_the_undecided(tmp_path):
    _write_meta(tmp_path / "before", _CODES, _HASHES)
    path = str(tmp_path / "record.json")
    assert record.save(str(tmp_path / "before"), path) == 3
    assert record.restore(str(tmp_path / "after"), path) == 3
    meta = json.loads((tmp_path / "after" / "cbp" / "core" / "lagrangian.py.meta").read_text("utf-8"))
    assert meta == {"exit_code_by_key": {key: code for key, code in _CODES.items() if code is not None},
                    "hash_by_function_name": _HASHES, "type_check_error_by_key": {},
                    "durations_by_key": {}, "estimated_durations_by_key": {}}


def test_a_result_without_its_function_hash_is_not_recorded(tmp_path):
    _write_meta(tmp_path / "before", _CODES, {"x_helper": "bbbb"})
    path = str(tmp_path / "record.json")
    assert record.save(str(tmp_path / "before"), path) == 1
    assert json.loads(open(path, encoding="utf-8").read()) == {
        "cbp/core/lagrangian.py": {"x_helper": {"hash": "bbbb", "codes": {"12": 33}}}}


def test_a_run_with_nothing_decided_keeps_the_record(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("kept")
    _write_meta(tmp_path / "before", dict.fromkeys(_CODES), _HASHES)
    assert record.save(str(tmp_path / "before"), str(path)) == 0
    assert path.read_text() == "kept"


def test_restore_never_writes_into_an_existing_mutants_folder(tmp_path):
    _write_meta(tmp_path / "before", _CODES, _HASHES)
    path = str(tmp_path / "record.json")
    record.save(str(tmp_path / "before"), path)
    with pytest.raises(SystemExit, match="exists"):
        record.restore(str(tmp_path / "before"), path)
