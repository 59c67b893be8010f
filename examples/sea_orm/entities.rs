//! SeaORM's view of the social app's tables (`examples/social/migrations`):
//! one entity per table, with the columns the API reads and writes.
//!
//! The timestamp columns (`posts.created_at`, `profiles.updated_at`,
//! `accounts.created_at`, `logins.at`) are left out of the models: their
//! defaults fill them on insert, and the API shows them as text the server
//! formats ([`post::CREATED_AT`], [`login::AT`]), as the other apps do, so
//! no model needs a date-time type (SeaORM's `with-chrono` or `with-time`
//! feature, which would rebuild sqlx with it).

/// The `posts` table.
pub mod post {
    use sea_orm::entity::prelude::*;

    /// One post.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "posts")]
    pub struct Model {
        /// The post's id, from its `bigserial`.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// Its author.
        pub user_id: i64,
        /// What was posted.
        pub content: String,
    }

    /// No relations: the app joins nothing.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    /// `created_at` as the API shows it, RFC 3339 in UTC with microseconds,
    /// formatted by the server in the social app's words.
    pub const CREATED_AT: &str = "to_char(\"posts\".\"created_at\" at time zone 'UTC', \
         'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";
}

/// The `profiles` table: one row per user, keyed by their id.
pub mod profile {
    use sea_orm::entity::prelude::*;

    /// One user's profile.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "profiles")]
    pub struct Model {
        /// Whose profile: the user's id, not generated.
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: i64,
        /// Display name.
        pub name: String,
        /// About the user; the table's default is empty.
        pub bio: String,
    }

    /// No relations: the app joins nothing.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    /// The column an edit stamps with the time; not in the model (see the
    /// module docs), so named here for the upsert.
    pub const UPDATED_AT: &str = "updated_at";
}

/// The `accounts` table: who signed up. Ids come from an identity column
/// that starts at 1,000,000.
pub mod account {
    use sea_orm::entity::prelude::*;

    /// One account.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "accounts")]
    pub struct Model {
        /// The account's id, which is the user's id.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// The name signed up with.
        pub name: String,
    }

    /// No relations: the app joins nothing.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `logins` table: a row per login.
pub mod login {
    use sea_orm::entity::prelude::*;

    /// One login.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "logins")]
    pub struct Model {
        /// The login row's id, from its `bigserial`.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// Who logged in.
        pub user_id: i64,
    }

    /// No relations: the app joins nothing.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    /// `at` as the API shows it, RFC 3339 in UTC with microseconds,
    /// formatted by the server in the social app's words.
    pub const AT: &str = "to_char(\"logins\".\"at\" at time zone 'UTC', \
         'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";
}
