"""The TES backend: each task is one GA4GH TES 1.0/1.1 task (Funnel, TESK, Microsoft TES).

``backend`` runs tasks, ``monitor`` follows them, ``api`` speaks the TES API on the one HTTP
session of ``http``, and ``layout`` says where a task's files sit in its container.
"""
