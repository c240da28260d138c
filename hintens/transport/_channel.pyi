# Type stub of the compiled socket transport; hintens/transport/_channel_py.py is its
# pure-Python twin with the same API.
from typing import Any

from ._channel_py import Channel as Channel
from ._channel_py import Mapping as Mapping
from ._channel_py import SharedRegion as SharedRegion

__all__: list[str]
SEES_VIEW_RELEASE: bool

def call_with_stack_size(stack_bytes: int, function: Any, *args: Any) -> Any: ...
