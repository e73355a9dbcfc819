import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)
    # the example's posterior is sensible: loc near the data mean, scale positive
    median = namespace["guide"].median(namespace["x"])
    assert abs(float(median["loc"]) - float(namespace["x"].mean())) < 0.5
    assert float(median["scale"]) > 0
