from istr.model.istr import ISTR, build_model

__all__ = ["ISTR", "build_model"]
