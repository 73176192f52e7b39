# Textual imports its widgets lazily (textual.widgets.__getattr__) and ships CSS and other data files.
from PyInstaller.utils.hooks import collect_data_files, collect_submodules

hiddenimports = collect_submodules("textual.widgets") + collect_submodules("textual.css") + ["textual.drivers.linux_driver"]
datas = collect_data_files("textual")
