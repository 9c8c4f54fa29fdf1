import lazycluster_tasks as lt
from lazycluster_tasks import errors


def test_every_error_derives_from_the_base_and_is_exported():
    classes = [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
    ]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, lt.LazyclusterError)
        assert getattr(lt, cls.__name__) is cls
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} missing from the drawn tree"


def test_transient_classification():
    assert lt.is_transient(lt.HostConnectionError("refused", host="h"))
    assert lt.is_transient(lt.OperationTimeoutError("slow"))
    assert lt.is_transient(ConnectionResetError())
    assert not lt.is_transient(lt.AuthenticationError("denied"))
    assert not lt.is_transient(lt.HostKeyError("changed"))
    assert not lt.is_transient(ValueError("bad input"))
    mixed = lt.GroupError("run", {"a": 1}, {"b": lt.HostConnectionError("x"), "c": ValueError()})
    assert not lt.is_transient(mixed)
    only_net = lt.GroupError("run", {}, {"b": lt.HostConnectionError("x")})
    assert lt.is_transient(only_net)


def test_group_error_names_every_failed_host():
    err = lt.GroupError("echo", {"a": "ok"}, {"b": RuntimeError("boom"), "c": OSError("gone")})
    text = str(err)
    assert "2 of 3 hosts" in text and "b: RuntimeError: boom" in text and "c: OSError: gone" in text
    assert err.results == {"a": "ok"}
    assert set(err.errors) == {"b", "c"}
