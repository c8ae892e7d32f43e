"""Tool sources: each turns something into ``(ToolDefinition, Executor)`` pairs for the registry.

* :mod:`.python` - a Python function (``@tool``, :func:`python_tool`, :func:`load_python_tool`).
* :mod:`.openapi` - every operation of an OpenAPI 3.x document (:func:`import_openapi`).
* :mod:`.mcp` - the tools of an MCP server (``MCPToolSource``, ``MCPConnections``). Imported
  from its own module only, because the MCP SDK is an optional extra (``controltower[mcp]``).
"""

from __future__ import annotations

from controltower.gateway.sources.openapi import import_openapi, load_openapi_document, openapi_executor
from controltower.gateway.sources.python import PythonTool, load_python_tool, python_tool, tool

__all__ = [
    "PythonTool",
    "import_openapi",
    "load_openapi_document",
    "load_python_tool",
    "openapi_executor",
    "python_tool",
    "tool",
]
