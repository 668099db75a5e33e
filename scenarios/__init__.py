"""Ready-to-run training scenarios (``*.yaml`` next to this file) and the model zoo they name.

Load one with ``planner.scenario.load_scenario("resnet")``; the format is documented there.
"""
