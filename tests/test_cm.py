"""cm plugin: conformance on the three backbones and its maths against closed forms."""



from fewstep.testing import MethodConformance


class TestCDConformance(MethodConformance):
    method = {"name": "cd", "num_scales": 8}


class TestCDGuidedConformance(MethodConformance):
    method = {"name": "cd", "num_scales": 8, "guidance": [1.0, 3.0], "target_ema": 0.9}
    backbones = ("unet_condition", "dit")


class TestCTConformance(MethodConformance):
    method = {"name": "ct", "s0": 2, "s1": 10}


class TestICTConformance(MethodConformance):
    method = {"name": "ict", "s0": 2, "s1": 16}
