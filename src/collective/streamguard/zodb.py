"""A producer's own ZODB connection and transaction, outside the request's.

Under Zope's WSGI publisher a body iterator runs after the request's
transaction has been committed and its ZODB connection closed, and after
``request.close()`` has cleared the site (``ZPublisher.WSGIPublisher``'s
``publish_module`` does both before it returns the body): no persistent
object of the request may be touched any more.  ``ZODBSession`` captures
plain values in the view (paths, the user's id, the DB) and, in the serving
thread, opens a connection of its own with a transaction manager of its
own, restores the user and the site, and at the end commits (the producer
finished) or aborts (the client left, an error, a timeout, shutdown) and
always gives the connection back to the pool.

A parked stream (``collective.streamguard.hub``) runs its steps in
whichever worker thread is free: ``enter()`` and ``leave()`` make the
session's transaction manager, request, site and user current around each
step and give the thread back what it had (``guard.add_step_hooks``), and
``leave()`` runs before the first park too, so the next page on the
serving thread never joins the stream's transaction.

Its transaction manager is also made the serving thread's current one for
the stream's life (each step's, once parked), because Plone code joins ``transaction.get()`` (the
catalog's indexing queue does) and must join *this* transaction.  A
``zope.sqlalchemy`` session is joined to it with
``register(session, transaction_manager=guard.zodb.transaction_manager)``
and is then rolled back with it when the client leaves, rather than left
half used mid-query.
"""

import logging
import threading

import transaction
from AccessControl.SecurityManagement import getSecurityManager
from AccessControl.SecurityManagement import newSecurityManager
from AccessControl.SecurityManagement import noSecurityManager
from AccessControl.SecurityManagement import setSecurityManager
from AccessControl.SpecialUsers import nobody
from Acquisition import aq_base
from Acquisition import aq_inner
from Acquisition import aq_parent
from Testing.makerequest import makerequest
from zope.component.hooks import getSite
from zope.component.hooks import setSite
from zope.globalrequest import clearRequest
from zope.globalrequest import getRequest
from zope.globalrequest import setRequest

from collective.streamguard.guard import StreamError
from collective.streamguard.streams import EndReason

logger = logging.getLogger("collective.streamguard")

# What the producer's own request keeps of the original environ, so that
# absolute_url() and friends give the same answers as during the view.
ENVIRON_KEYS = (
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "SCRIPT_NAME",
    "HTTP_HOST",
    "HTTPS",
    "wsgi.url_scheme",
    "REMOTE_ADDR",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_ACCEPT_LANGUAGE",
)


_open_sessions = set()
_open_sessions_lock = threading.Lock()


def open_sessions():
    """How many producers' ZODB sessions are open now (for status and tests)."""
    with _open_sessions_lock:
        return len(_open_sessions)


def swap_index_queue(state):
    """Make ``state`` this thread's state of CMF's indexing queue; return
    the state it had.

    ``Products.CMFCore.indexing`` queues catalog work per thread, and the
    catalog processes the queue before every search and at commit.  A
    producer's steps share their thread with whatever else runs there: a
    test's uncommitted content (its queue was indexed into the stream's
    catalog, and committed with it), or, for a parked stream, the next page
    (which would index the stream's objects in its own transaction).  So a
    stream keeps a queue state of its own, current while it runs.
    """
    try:
        from Products.CMFCore.indexing import getQueue
    except ImportError:  # a Zope without CMF: no queue
        return state
    queue = getQueue()
    before = (queue.queue, queue.tmhook)
    queue.queue, queue.tmhook = state
    return before


class WriteRefused(StreamError):
    """The stream's transaction writes, and its request may not write
    (``IStreamWritePolicy``): it is aborted, and the stream fails."""


class ZODBSession:
    """Captured in the view; opened in the serving thread; closed once.

    In the producer, ``guard.zodb`` is this object: ``context`` (the view's
    context in the new connection), ``site``, ``app``, ``request``,
    ``transaction_manager`` and ``commit()`` for long batch work.
    """

    def __init__(self, context, request, write_check=None):
        """``write_check(session)``: what ``IStreamWritePolicy`` answered for
        ``request``; run before every commit, it raises ``WriteRefused``."""
        self.write_check = write_check
        jar = aq_base(context)._p_jar
        if jar is None:
            raise TypeError(f"{context!r} is not stored in the ZODB: nothing to reopen")
        self.db = jar.db()
        self.context_path = context.getPhysicalPath()
        site = getSite()
        self.site_path = site.getPhysicalPath() if hasattr(site, "getPhysicalPath") else None
        user = getSecurityManager().getUser()
        self.user_id = user.getId() if user is not None else None
        user_folder = aq_parent(aq_inner(user)) if user is not None else None
        self.user_folder_path = (
            user_folder.getPhysicalPath() if hasattr(user_folder, "getPhysicalPath") else None
        )
        self.environ = {k: request.environ[k] for k in ENVIRON_KEYS if k in request.environ}
        self.server_url = request.get("SERVER_URL")
        self.virtual_root = request.get("VirtualRootPhysicalPath")
        #: Where the session runs, for the undo log ("" in the web process).
        self.place = ""
        self._reset()

    #: What ``plain()`` carries to a worker process (``from_plain``).
    PLAIN = (
        "context_path",
        "site_path",
        "user_id",
        "user_folder_path",
        "environ",
        "server_url",
        "virtual_root",
    )

    def plain(self):
        """What this session captured, as JSON-able data (for a worker)."""
        data = {name: getattr(self, name) for name in self.PLAIN}
        for name in ("context_path", "site_path", "user_folder_path", "virtual_root"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_plain(cls, db, data, write_check=None):
        """A session on ``db`` (a worker's, a ZEO client of the same
        storage) for what ``plain()`` gave: the same context, site, user."""
        session = cls.__new__(cls)
        session.write_check = write_check
        session.db = db
        for name in cls.PLAIN:
            value = data.get(name)
            if name.endswith("_path") or name == "virtual_root":
                value = tuple(value) if value is not None else None
            setattr(session, name, value)
        session.environ = dict(session.environ or {})
        session.place = ""
        session._reset()
        return session

    def _reset(self):
        # Nothing opened yet (the serving thread's or the worker's session).
        self.transaction_manager = None
        self.connection = None
        self.context = self.site = self.app = self.request = None
        self._guard = None
        self._thread_manager = None
        self._security_manager = None
        #: What ``leave()`` gives the thread back; None while not entered.
        self._saved = None
        #: The stream's own state of CMF's indexing queue (swap_index_queue).
        self._index_queue = ([], None)
        self._closed = False

    def open(self, guard):
        """Open the connection and set up user, site and request (serving thread)."""
        self._guard = guard
        guard.zodb = self
        # Registered first, so it runs after every cleanup the producer adds.
        guard.add_cleanup(self.close)
        guard.add_ending(self.end_transaction)
        with _open_sessions_lock:
            _open_sessions.add(id(self))
        self.transaction_manager = transaction.TransactionManager()
        # Make it the thread's current manager (see the module docstring).
        self._thread_manager = transaction.manager.manager
        transaction.manager.manager = self.transaction_manager
        thread_index_queue = swap_index_queue(self._index_queue)
        self.connection = self.db.open(transaction_manager=self.transaction_manager)
        self.begin()
        root = self.connection.root()["Application"]
        self.app = makerequest(root, environ=dict(self.environ))
        self.request = self.app.REQUEST
        if self.server_url:
            self.request.other["SERVER_URL"] = self.server_url
        if self.virtual_root:
            self.request.other["VirtualRootPhysicalPath"] = self.virtual_root
        setRequest(self.request)
        if self.site_path is not None:
            self.site = self.app.unrestrictedTraverse(self.site_path)
            setSite(self.site)
        newSecurityManager(self.request, self._user())
        self.context = self.app.unrestrictedTraverse(self.context_path)
        self._security_manager = getSecurityManager()
        # Leaving the serving thread clears what open() set, as close() does.
        self._saved = (self._thread_manager, None, None, None, thread_index_queue)
        guard.add_step_hooks(self.enter, self.leave)

    def enter(self):
        """Make this session current in this thread (a parked stream's step)."""
        if self._saved is not None or self.connection is None or self._closed:
            return
        self._saved = (
            transaction.manager.manager,
            getSite(),
            getRequest(),
            getSecurityManager(),
            swap_index_queue(self._index_queue),
        )
        transaction.manager.manager = self.transaction_manager
        setRequest(self.request)
        setSite(self.site)
        setSecurityManager(self._security_manager)

    def leave(self):
        """Give this thread back what it had before ``enter()``/``open()``."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        manager, site, request, security_manager, index_queue = saved
        transaction.manager.manager = manager
        self._index_queue = swap_index_queue(index_queue)
        setSite(site)
        if request is None:
            clearRequest()
        else:
            setRequest(request)
        if security_manager is None:
            noSecurityManager()
        else:
            setSecurityManager(security_manager)

    def _user(self):
        if self.user_id is None or self.user_folder_path is None:
            return nobody
        user_folder = self.app.unrestrictedTraverse(self.user_folder_path)
        user = user_folder.getUserById(self.user_id)
        if user is None:
            logger.warning("stream user %r no longer exists; running as nobody", self.user_id)
            return nobody
        return user if hasattr(user, "aq_parent") else user.__of__(user_folder)

    def commit(self):
        """Commit what the producer did so far and go on in a new transaction.

        Raises ``WriteRefused`` (the transaction is aborted, the stream
        fails) where the request may not write: in Plone, a request without
        plone.protect's CSRF protection."""
        self.check_writes()
        self.transaction_manager.commit()
        self.begin()

    def begin(self):
        """Begin the session's next transaction, described as Zope's
        publisher describes a request's (``recordMetaData``): the undo log
        and ``db.history()`` name the user and the context, and where the
        stream ran (``place``: a worker's name)."""
        txn = self.transaction_manager.begin()
        where = f", {self.place}" if self.place else ""
        txn.note(f"{'/'.join(self.context_path)} (collective.streamguard stream{where})")
        if self.user_id is not None and self.user_folder_path is not None:
            txn.setUser(self.user_id, "/".join(self.user_folder_path[1:-1]))

    def check_writes(self):
        """Abort and raise ``WriteRefused`` if the transaction writes and the
        request may not."""
        if self.write_check is None:
            return
        try:
            self.write_check(self)
        except WriteRefused:
            self.transaction_manager.abort()
            raise

    def registered_objects(self):
        """The persistent objects this transaction has changed, in every
        database of the connection (plone.protect looks at the same)."""
        return [
            obj
            for name, connection in self.connection.connections.items()
            if name != "temporary"  # session data, written on every read
            for obj in connection._registered_objects
        ]

    def end_transaction(self):
        """Commit if the producer finished, abort otherwise.

        Runs as the stream's ending, before its cleanups, so that data
        managers joined to the transaction (an SQL session) are still open.
        """
        tm = self.transaction_manager
        if self.connection is None:
            return  # open() failed before it had a connection
        if self._guard.reason is EndReason.FINISHED:
            # WriteRefused goes up: the stream then ends as failed.
            self.check_writes()
            try:
                tm.commit()
                return
            except Exception as error:
                # A ConflictError (another thread or ZEO client changed the
                # same object), say: nothing is half-committed, and the
                # stream ends as failed, so that its client can tell.
                tm.abort()
                raise StreamError(
                    f"its final commit failed and was aborted: {type(error).__name__}: {error}"
                ) from error
        tm.abort()

    def close(self):
        """Give the connection back and clear the thread's user, site,
        request and transaction manager.  Runs as the last cleanup."""
        try:
            if self.connection is not None:
                # Anything a cleanup did after the ending is not kept.
                self.transaction_manager.abort()
                if self.request is not None:
                    # Its EndRequestEvent is looked up in the site's
                    # registry, which lives in this connection: close it
                    # first (a site whose registry the producer never loaded
                    # could not be read once the connection is closed).
                    self.request.close()
                    self.request = None
                    self.transaction_manager.abort()
                self.connection.close()
        finally:
            self.context = self.site = self.app = None
            if self.request is not None:
                self.request.close()
                self.request = None
            if self._saved is not None:
                self.leave()
            else:
                noSecurityManager()
                setSite(None)
                clearRequest()
                transaction.manager.manager = self._thread_manager
            self._closed = True
            with _open_sessions_lock:
                _open_sessions.discard(id(self))
