"""The "operators" group: may force a step-down or switchover."""

from django.db import migrations


def create_operators(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    Group = apps.get_model("auth", "Group")
    # Permissions are normally created after migrate; make this one now so the group has it.
    content_type, _ = ContentType.objects.get_or_create(app_label="elections", model="election")
    permission, _ = Permission.objects.get_or_create(
        codename="force_stepdown",
        content_type=content_type,
        defaults={"name": "Can force a step-down or switchover"},
    )
    group, _ = Group.objects.get_or_create(name="operators")
    group.permissions.add(permission)


def remove_operators(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name="operators").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("elections", "0002_control_plane"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_operators, remove_operators)]
