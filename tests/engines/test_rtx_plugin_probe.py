"""Records WHY Python IPluginV3 plugins cannot be built with TensorRT-RTX (run in a subprocess:
the failure kills the process). If a future RTX release fixes it, this test fails and says so."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (the rtx extra) is not installed")

PROBE = textwrap.dedent('''
    import numpy as np, onnx
    from onnx import helper, TensorProto
    import tensorrt_rtx_bindings as trt

    class P(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, phase=None):
            for base in (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
                base.__init__(self)
            self.num_outputs, self.plugin_namespace, self.plugin_name, self.plugin_version = 1, "imkd", "Widget", "1"
            self.timing_cache_id, self.phase = "", phase
        def get_capability_interface(self, t): print("capability", flush=True); return self
        def get_output_data_types(self, t): return [t[0]]
        def get_output_shapes(self, i, s, e): return [trt.DimsExprs(i[0])]
        def get_fields_to_serialize(self): return trt.PluginFieldCollection([])
        def supports_format_combination(self, pos, io, n): return io[pos].desc.type == trt.DataType.FLOAT
        def configure_plugin(self, i, o): pass
        def on_shape_change(self, i, o): pass
        def attach_to_context(self, c): return self.clone()
        def get_valid_tactics(self): return []
        def set_tactic(self, t): pass
        def enqueue(self, *a): pass
        def clone(self): c = P(self.phase); c.__dict__.update(self.__dict__); return c

    KEEP = []
    class C(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = "Widget", "imkd", "1"
            self.field_names = trt.PluginFieldCollection([])
        def create_plugin(self, name, fc, phase):
            KEEP.append(P(phase)); print("create_plugin", flush=True); return KEEP[-1]

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Widget", ["x"], ["y"], domain="imkd", plugin_namespace="imkd", plugin_version="1")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("imkd", 1)])
    creator = C()
    assert trt.get_plugin_registry().register_creator(creator, "imkd")
    log = trt.Logger(trt.Logger.ERROR)
    net = trt.Builder(log).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    ok = trt.OnnxParser(net, log).parse(model.SerializeToString())
    print("parsed", ok, flush=True)
''')


def test_rtx_network_has_no_plugin_layers_and_parser_aborts(tmp_path):
    net_api = [n for n in dir(trt.INetworkDefinition) if "plugin" in n.lower()]
    assert net_api == [], f"TensorRT-RTX {trt.__version__} now has plugin layers: {net_api}; revisit plugins.py"
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "create_plugin" in proc.stdout                          # the creator WAS found and called
    assert "capability" not in proc.stdout and "parsed" not in proc.stdout
    assert proc.returncode == -6                                   # SIGABRT
    assert "terminate called without an active exception" in proc.stderr
