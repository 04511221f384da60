"""The conversation history, one interface over two databases: SQLite in the data folder (embedded, the default) or
PostgreSQL named by a ``postgresql://`` URL (shared by several servers).

- ``store``: ``History``, what the app, the CLI and the service call, and every query both databases run alike
- ``sqlite``, ``postgres``: what each database does its own way (connecting, schema scripts, search, failures)
- ``records``: messages, conversations, ``HistoryError``
- ``transfer``: the export document's checks, Markdown export, export files
"""

from appliance.history.records import SCHEMA_VERSION, Conversation, HistoryError, Message, pair_turns
from appliance.history.sqlite import DB_FILE
from appliance.history.store import History
from appliance.history.transfer import read_export, write_export

__all__ = ["DB_FILE", "SCHEMA_VERSION", "Conversation", "History", "HistoryError", "Message", "pair_turns",
           "read_export", "write_export"]
