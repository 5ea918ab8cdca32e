"""Property-based API fuzzing (schemathesis) against the app's own OpenAPI document.

Every operation is called with generated inputs, anonymously and with the token of each role
(organizer, inventor, analyst), and every answer is checked with ALL of schemathesis' default
checks: no server error (5xx), a status code the document lists, the documented content type and
a body that validates against the documented schema (errors included: ``{"detail": "..."}``,
services/api/errors.py ERROR_RESPONSES). Bounded for CI: a few examples per operation.

Excluded: ``POST /api/v1/submissions`` (the image upload). Its body is a streamed multipart form
that intake parses by hand (services/api/intake.py), so the OpenAPI document describes no request
body for it that schemathesis could generate; its inputs are covered by test_api_upload_services.py.
"""

from __future__ import annotations

import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings

from services.db.models import ApiToken
from services.db.session import create_db_engine

ROLES = (None, "org", "inv_a", "ana")
#: examples per operation (each is sent 4 times: anonymous and once per role)
MAX_EXAMPLES = 25
UPLOAD = ("POST", "/api/v1/submissions")
#: every default check runs; positive_data_acceptance ("a schema-valid request is accepted") also
#: allows 422: the API refuses, with a 422 naming the field, inputs that JSON Schema cannot express
#: (an inventor without a team, NUL characters or lone surrogates in text, a manifest outside the
#: import roots); 400/413 are not allowed there, 5xx never anywhere
CONFIG = {"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2XX", "3XX", "401", "403", "404", "409", "422", "429"]}}}


def _restore_accounts(settings) -> None:
    """A generated DELETE /tokens/{id} may revoke a role's token: give it back for the next operation."""
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.update(ApiToken).values(revoked_at=None))
    engine.dispose()


def test_api_conforms_to_its_schema_for_every_role(app, world, settings):
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app,
                                            config=schemathesis.config.SchemathesisConfig.from_dict(CONFIG))
    role_headers = [{} if role is None else world["headers"][role] for role in ROLES]
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.full_path) == UPLOAD:
            continue
        operations += 1

        @given(case=operation.as_strategy())
        @hyp_settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
        def run(case):
            for headers in role_headers:
                case.call_and_validate(headers=headers)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected: one report naming every failing operation
            failures.append(f"{operation.method.upper()} {operation.full_path}: {exc}"[:3000])
        _restore_accounts(settings)
    assert operations >= 25
    assert not failures, "\n\n".join(failures)
