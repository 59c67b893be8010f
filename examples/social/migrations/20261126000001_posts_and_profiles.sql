-- The social app's schema: posts and profiles.
create table if not exists posts (
    id bigserial primary key,
    user_id bigint not null,
    content text not null,
    created_at timestamptz not null default now()
);
create index if not exists posts_by_user on posts (user_id, id desc);

create table if not exists profiles (
    user_id bigint primary key,
    name text not null,
    bio text not null default '',
    updated_at timestamptz not null default now()
);
