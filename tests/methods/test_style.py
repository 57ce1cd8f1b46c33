"""The style plan of the style-conditioned models (methods/_style.py: c-Prob. U-Net, c-SSN)."""

import pytest

from amisbench.errors import UserError
from amisbench.methods._style import style_plan


# ---------------------------------------------------------------------------------------------------
# c-Prob. U-Net / c-SSN: style conditioning
# ---------------------------------------------------------------------------------------------------

def test_style_plan():
    assert style_plan("mix", 7, 3, "x") == [(0, [0, 3, 6]), (1, [1, 4]), (2, [2, 5])]
    assert style_plan(1, 4, 3, "x") == [(1, [0, 1, 2, 3])]
    with pytest.raises(UserError, match="method.style"):
        style_plan(3, 4, 3, "method.style")
