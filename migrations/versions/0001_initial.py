"""initial schema

Revision ID: 0001_initial
Revises: (none)
Create Date: 2026-11-26 23:17:33.992357
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001_initial'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    
    op.create_table('teams',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('intake_counter', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_teams')),
    sa.UniqueConstraint('name', name=op.f('uq_teams_name'))
    )
    op.create_table('testsets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('protocol_name', sa.String(length=100), nullable=False),
    sa.Column('protocol_version', sa.String(length=50), nullable=False),
    sa.Column('protocol_key', sa.String(length=160), nullable=False),
    sa.Column('protocol_json', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('manifest_sha256', sa.String(length=64), nullable=False),
    sa.Column('manifest_path', sa.Text(), nullable=True),
    sa.Column('root_path', sa.Text(), nullable=False),
    sa.Column('time_per_case_s', sa.Double(), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('gpus', sa.Integer(), nullable=False),
    sa.Column('shm_bytes', sa.BigInteger(), nullable=False),
    sa.Column('pids_limit', sa.Integer(), nullable=False),
    sa.Column('shard_size', sa.Integer(), nullable=False),
    sa.Column('quota_submissions', sa.Integer(), nullable=False),
    sa.Column('quota_period_days', sa.Integer(), nullable=False),
    sa.Column('is_open', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_testsets')),
    sa.UniqueConstraint('name', name=op.f('uq_testsets_name'))
    )
    op.create_table('algorithms',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('team_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('paper_url', sa.Text(), nullable=True),
    sa.Column('code_url', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_algorithms_team_id_teams'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_algorithms')),
    sa.UniqueConstraint('team_id', 'name', name=op.f('uq_algorithms_team_id_name'))
    )
    with op.batch_alter_table('algorithms', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_algorithms_team_id'), ['team_id'], unique=False)

    op.create_table('cases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('testset_id', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.String(length=200), nullable=False),
    sa.Column('hospital', sa.String(length=200), nullable=True),
    sa.Column('age', sa.Integer(), nullable=True),
    sa.Column('sex', sa.String(length=20), nullable=True),
    sa.Column('race', sa.String(length=100), nullable=True),
    sa.Column('manufacturer', sa.String(length=200), nullable=True),
    sa.Column('scanner', sa.String(length=200), nullable=True),
    sa.Column('contrast_phase', sa.String(length=100), nullable=True),
    sa.Column('diagnosis', sa.String(length=200), nullable=True),
    sa.Column('extra', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('image_path', sa.Text(), nullable=False),
    sa.Column('labels_path', sa.Text(), nullable=False),
    sa.Column('image_sha256', sa.String(length=64), nullable=True),
    sa.Column('labels_sha256', sa.String(length=64), nullable=True),
    sa.Column('public_sample', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.ForeignKeyConstraint(['testset_id'], ['testsets.id'], name=op.f('fk_cases_testset_id_testsets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cases')),
    sa.UniqueConstraint('testset_id', 'case_id', name=op.f('uq_cases_testset_id_case_id'))
    )
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.create_index('ix_cases_testset_hospital', ['testset_id', 'hospital'], unique=False)

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.Enum('organizer', 'inventor', 'analyst', name='role', native_enum=False, length=32), nullable=False),
    sa.Column('team_id', sa.Integer(), nullable=True),
    sa.Column('is_active', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_users_team_id_teams'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_users_team_id'), ['team_id'], unique=False)

    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_tokens_token_sha256'))
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_tokens_user_id'), ['user_id'], unique=False)

    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('actor_id', sa.Integer(), nullable=True),
    sa.Column('action', sa.String(length=100), nullable=False),
    sa.Column('target', sa.String(length=200), nullable=True),
    sa.Column('details', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['actor_id'], ['users.id'], name=op.f('fk_audit_log_actor_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_actor_id'), ['actor_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)

    op.create_table('submissions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('algorithm_id', sa.Integer(), nullable=False),
    sa.Column('testset_id', sa.Integer(), nullable=False),
    sa.Column('team_id', sa.Integer(), nullable=False),
    sa.Column('submitted_by_id', sa.Integer(), nullable=True),
    sa.Column('state', sa.Enum('received', 'validating', 'queued', 'running', 'evaluating', 'scored', 'published', 'failed', 'cancelled', name='submissionstate', native_enum=False, length=32), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('validating_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('running_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('evaluating_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('scored_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('image_ref', sa.Text(), nullable=True),
    sa.Column('image_path', sa.Text(), nullable=True),
    sa.Column('image_sha256', sa.String(length=64), nullable=True),
    sa.Column('image_digest', sa.String(length=80), nullable=True),
    sa.Column('image_size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('counts_against_quota', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('validation_log', sa.Text(), nullable=True),
    sa.Column('is_baseline', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('rerun_count', sa.Integer(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['algorithm_id'], ['algorithms.id'], name=op.f('fk_submissions_algorithm_id_algorithms'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['submitted_by_id'], ['users.id'], name=op.f('fk_submissions_submitted_by_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_submissions_team_id_teams'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['testset_id'], ['testsets.id'], name=op.f('fk_submissions_testset_id_testsets'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_submissions'))
    )
    with op.batch_alter_table('submissions', schema=None) as batch_op:
        batch_op.create_index('ix_submissions_algorithm_sha', ['algorithm_id', 'image_sha256'], unique=False)
        batch_op.create_index('ix_submissions_team_received', ['team_id', 'testset_id', 'received_at'], unique=False)
        batch_op.create_index('ix_submissions_testset_state', ['testset_id', 'state'], unique=False)

    op.create_table('aggregates',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('submission_id', sa.Integer(), nullable=False),
    sa.Column('protocol_key', sa.String(length=160), nullable=False),
    sa.Column('organ', sa.String(length=50), nullable=False),
    sa.Column('metric', sa.String(length=20), nullable=False),
    sa.Column('scope', sa.String(length=50), nullable=False),
    sa.Column('group_value', sa.String(length=200), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('mean', sa.Double(), nullable=True),
    sa.Column('median', sa.Double(), nullable=True),
    sa.Column('std', sa.Double(), nullable=True),
    sa.Column('ci_low', sa.Double(), nullable=True),
    sa.Column('ci_high', sa.Double(), nullable=True),
    sa.Column('n_failed', sa.Integer(), nullable=False),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['submission_id'], ['submissions.id'], name=op.f('fk_aggregates_submission_id_submissions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aggregates')),
    sa.UniqueConstraint('submission_id', 'protocol_key', 'organ', 'metric', 'scope', 'group_value', name=op.f('uq_aggregates_submission_id_protocol_key_organ_metric_scope_group_value'))
    )
    with op.batch_alter_table('aggregates', schema=None) as batch_op:
        batch_op.create_index('ix_aggregates_board', ['protocol_key', 'scope', 'metric', 'organ'], unique=False)

    op.create_table('scores',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('submission_id', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('organ', sa.String(length=50), nullable=False),
    sa.Column('protocol_key', sa.String(length=160), nullable=False),
    sa.Column('dsc', sa.Double(), nullable=True),
    sa.Column('nsd', sa.Double(), nullable=True),
    sa.Column('hd95', sa.Double(), nullable=True),
    sa.Column('assd', sa.Double(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_scores_case_id_cases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['submission_id'], ['submissions.id'], name=op.f('fk_scores_submission_id_submissions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scores')),
    sa.UniqueConstraint('submission_id', 'case_id', 'organ', 'protocol_key', name=op.f('uq_scores_submission_id_case_id_organ_protocol_key'))
    )
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.create_index('ix_scores_case', ['case_id'], unique=False)
        batch_op.create_index('ix_scores_submission_protocol_organ', ['submission_id', 'protocol_key', 'organ'], unique=False)

    op.create_table('shards',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('submission_id', sa.Integer(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('case_ids', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('state', sa.Enum('pending', 'running', 'succeeded', 'failed', 'cancelled', name='shardstate', native_enum=False, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('worker_hostname', sa.String(length=255), nullable=True),
    sa.Column('container_id', sa.String(length=128), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('peak_memory_bytes', sa.BigInteger(), nullable=True),
    sa.Column('gpu_memory_peak_bytes', sa.BigInteger(), nullable=True),
    sa.Column('gpu_memory_auc', sa.Double(), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('log_tail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['submission_id'], ['submissions.id'], name=op.f('fk_shards_submission_id_submissions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_shards')),
    sa.UniqueConstraint('submission_id', 'index', name=op.f('uq_shards_submission_id_index'))
    )
    op.create_table('case_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('submission_id', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('shard_id', sa.Integer(), nullable=True),
    sa.Column('wall_seconds', sa.Double(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_case_runs_case_id_cases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], name=op.f('fk_case_runs_shard_id_shards'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['submission_id'], ['submissions.id'], name=op.f('fk_case_runs_submission_id_submissions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_case_runs')),
    sa.UniqueConstraint('submission_id', 'case_id', name=op.f('uq_case_runs_submission_id_case_id'))
    )
    with op.batch_alter_table('case_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_case_runs_case_id'), ['case_id'], unique=False)

    


def downgrade() -> None:
    
    with op.batch_alter_table('case_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_case_runs_case_id'))

    op.drop_table('case_runs')
    op.drop_table('shards')
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.drop_index('ix_scores_submission_protocol_organ')
        batch_op.drop_index('ix_scores_case')

    op.drop_table('scores')
    with op.batch_alter_table('aggregates', schema=None) as batch_op:
        batch_op.drop_index('ix_aggregates_board')

    op.drop_table('aggregates')
    with op.batch_alter_table('submissions', schema=None) as batch_op:
        batch_op.drop_index('ix_submissions_testset_state')
        batch_op.drop_index('ix_submissions_team_received')
        batch_op.drop_index('ix_submissions_algorithm_sha')

    op.drop_table('submissions')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))
        batch_op.drop_index(batch_op.f('ix_audit_log_actor_id'))

    op.drop_table('audit_log')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_tokens_user_id'))

    op.drop_table('api_tokens')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_users_team_id'))

    op.drop_table('users')
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_index('ix_cases_testset_hospital')

    op.drop_table('cases')
    with op.batch_alter_table('algorithms', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_algorithms_team_id'))

    op.drop_table('algorithms')
    op.drop_table('testsets')
    op.drop_table('teams')
    
