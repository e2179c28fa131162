# RENOVATION SHIM: removed at merge
